// The loaded model's prompt format in SillyTavern: fetched from the bridge (derived from the model's own chat
// template), installed as ST's instruct, context and reasoning presets under the format's name, and
// compared with what ST has selected, so the panel can say when ST writes another format.

import { presetDifferences, presetsForSillyTavern } from './presets.js';
import { currentFormatting, enableInstructMode, ensureAddBos, hasStoryAffixes, installPreset, onFormattingChanged }
    from './host.js';

const CHECK_DEBOUNCE_MS = 250; // ST fires an input event per field when it applies a preset

export class PromptFormatSync {
    /**
     * @param {import('./api.js').BridgeClient} client
     * @param {() => void} onChange called whenever the format, its state in ST or an error changes
     */
    constructor(client, onChange) {
        this.client = client;
        this.onChange = onChange;
        this.model = ''; // the model `format` belongs to
        this.format = null; // GET /models/{id}/prompt-format
        this.differences = []; // fields where ST's selected presets differ from the model's (presets.js)
        this.error = '';
        this.installing = false;
        this.checkTimer = null;
        onFormattingChanged(() => this.scheduleCheck());
    }

    /**
     * The format of `model`, fetched once per model; null when there is none (no model, or an error).
     * @param {string} model
     */
    async fetch(model) {
        if (!model) {
            this.model = '';
            this.format = null;
            this.differences = [];
            this.onChange();
            return null;
        }
        if (model !== this.model || !this.format) {
            this.model = model;
            try {
                this.format = await this.client.promptFormat(model);
                this.error = '';
            } catch (error) {
                this.format = null;
                this.error = `Prompt format: ${error.message}`;
            }
        }
        this.check();
        return this.format;
    }

    /** @returns {{instruct: any, context: any, reasoning: any} | null} the presets for this ST release */
    wanted() {
        return this.format ? presetsForSillyTavern(this.format, { storyAffixes: hasStoryAffixes() }) : null;
    }

    /** Compare ST's selected presets with the model's (and redraw). */
    check() {
        const wanted = this.wanted();
        this.differences = wanted && !this.installing ? presetDifferences(wanted, currentFormatting()) : [];
        this.onChange();
    }

    scheduleCheck() {
        clearTimeout(this.checkTimer);
        this.checkTimer = setTimeout(() => this.check(), CHECK_DEBOUNCE_MS);
    }

    /**
     * Installs the format of `model` into ST and selects it: the context preset first, so that the instruct
     * preset's "bind to context" finds its namesake; then turns instruct mode (and, when the template
     * begins with BOS, "Add BOS token") on.
     * @param {string} model
     * @returns {Promise<boolean>} whether ST now writes the model's format
     */
    async install(model) {
        const format = await this.fetch(model);
        const wanted = this.wanted();
        if (!format || !wanted) return false;
        this.installing = true;
        try {
            await installPreset('context', wanted.context);
            await installPreset('instruct', wanted.instruct);
            if (wanted.reasoning) await installPreset('reasoning', wanted.reasoning);
            enableInstructMode();
            if (format.template_writes_bos) ensureAddBos();
            this.error = '';
        } catch (error) {
            this.error = `Prompt format not installed: ${error.message}`;
        } finally {
            this.installing = false;
        }
        this.check();
        return this.differences.length === 0;
    }
}
