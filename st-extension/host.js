// Everything the extension reads from or does to SillyTavern goes through this module, so differences
// between releases (1.12.x and current) are handled in one place. `SillyTavern.getContext()` is the stable
// surface; ST's own modules are imported only for what the context lacks, and only inside try/catch, so
// a release that moved them still loads the extension.

/** DOM ids of ST's Text Completion connection settings (the same from 1.12 to 1.19). */
export const ST_IDS = {
    mainApi: '#main_api',
    textgenType: '#textgen_type',
    connectButton: '#api_button_textgenerationwebui',
    streaming: '#streaming_textgenerationwebui',
    tokenizer: '#tokenizer',
    maxContext: '#max_context',
    maxContextCounter: '#max_context_counter',
    maxContextUnlocked: '#max_context_unlocked',
};

/** The server URL input and API key input of each Text Completion type the bridge speaks. */
export const TEXTGEN_TYPES = {
    koboldcpp: { url: '#koboldcpp_api_url_text', key: '#api_key_koboldcpp', label: 'KoboldCpp' },
    llamacpp: { url: '#llamacpp_api_url_text', key: '#api_key_llamacpp', label: 'llama.cpp' },
};

/** ST's "API (WebUI / koboldcpp)" tokenizer: token counts come from the backend itself. */
export const API_TOKENIZER = '6';
const MAX_CONTEXT_DEFAULT = 8192; // ST's slider stops here unless "unlocked"

/** @returns {any} a fresh context; its onlineStatus, mainApi and maxContext are copies taken now */
export function stContext() {
    return globalThis.SillyTavern.getContext();
}

/** @type {Promise<any> | null} */
let scriptModule = null;

/**
 * ST's script.js module, or null when it cannot be imported. The path climbs from
 * /scripts/extensions/third-party/<folder>/st-extension/ to the site root.
 * @returns {Promise<any>}
 */
function stScript() {
    scriptModule ??= import('../../../../../script.js').catch((error) => {
        console.warn('[st-bridge] script.js could not be imported; falling back to the DOM', error);
        return null;
    });
    return scriptModule;
}

/** @returns {string} 'no_connection' or the connected model's name */
export function onlineStatus() {
    return String(stContext().onlineStatus ?? 'no_connection');
}

/** @returns {boolean} */
export function isOnline() {
    return onlineStatus() !== 'no_connection';
}

/** @returns {boolean} ST is still running a status check (its Connect button shows a spinner) */
export function isConnecting() {
    return $(ST_IDS.connectButton).hasClass('disabled') || $('#textgenerationwebui_api .api_loading').is(':visible');
}

/** @returns {string} */
export function mainApi() {
    return String(stContext().mainApi ?? $(ST_IDS.mainApi).val() ?? '');
}

/** @returns {string} */
export function textgenType() {
    return String(stContext().textCompletionSettings?.type ?? $(ST_IDS.textgenType).val() ?? '');
}

/**
 * The server URL ST has for a Text Completion type.
 * @param {string} type
 * @returns {string}
 */
export function serverUrl(type) {
    const fromSettings = stContext().textCompletionSettings?.server_urls?.[type];
    return String(fromSettings ?? $(TEXTGEN_TYPES[type]?.url).val() ?? '');
}

/** @returns {number} ST's context size in tokens */
export function maxContext() {
    return Number(stContext().maxContext ?? $(ST_IDS.maxContext).val());
}

/**
 * Sets ST's context size, unlocking the slider above 8192 as ST itself does for presets.
 * @param {number} tokens
 */
export async function setMaxContext(tokens) {
    const script = await stScript();
    if (typeof script?.setGenerationParamsFromPreset === 'function') {
        script.setGenerationParamsFromPreset({ max_length: tokens });
    } else {
        $(ST_IDS.maxContextUnlocked).prop('checked', tokens > MAX_CONTEXT_DEFAULT).trigger('change');
        $(ST_IDS.maxContext).val(tokens).trigger('input');
        $(ST_IDS.maxContextCounter).val(tokens);
    }
    saveSettings();
}

/** @returns {Record<string, string>} the headers ST's own routes need (its CSRF token among them) */
export function stRequestHeaders() {
    return stContext().getRequestHeaders();
}

/**
 * SillyTavern's release, as its server reports it ([major, minor, patch]; [0, 0, 0] when it does not say).
 * @returns {Promise<number[]>}
 */
export async function sillyTavernVersion() {
    try {
        const reply = await fetch('/version', { headers: stRequestHeaders() });
        const { pkgVersion } = await reply.json();
        return String(pkgVersion).split('.').map((part) => parseInt(part, 10) || 0);
    } catch {
        return [0, 0, 0];
    }
}

/**
 * @param {number[]} version
 * @param {number[]} least
 * @returns {boolean} `version` is `least` or later
 */
export function atLeast(version, least) {
    for (let i = 0; i < least.length; i++) {
        if ((version[i] ?? 0) !== least[i]) return (version[i] ?? 0) > least[i];
    }
    return true;
}

export function saveSettings() {
    stContext().saveSettingsDebounced();
}

/**
 * @param {'success' | 'info' | 'warning' | 'error'} kind
 * @param {string} message
 * @param {string} [title]
 */
export function toast(kind, message, title = 'st-bridge') {
    globalThis.toastr?.[kind]?.(message, title);
}

/**
 * Calls `handler(status)` whenever ST's online status changes.
 * @param {(status: string) => void} handler
 */
export function onOnlineStatusChanged(handler) {
    const context = stContext();
    const types = context.eventTypes ?? context.event_types;
    context.eventSource.on(types.ONLINE_STATUS_CHANGED, handler);
}

/**
 * This extension's settings object inside ST's extension_settings, created from defaults and backfilled
 * with keys added in later versions.
 * @template T
 * @param {string} name
 * @param {T} defaults
 * @returns {T}
 */
export function extensionSettings(name, defaults) {
    const all = stContext().extensionSettings;
    all[name] ??= structuredClone(defaults);
    for (const [key, value] of Object.entries(defaults)) {
        if (all[name][key] === undefined) all[name][key] = structuredClone(value);
    }
    return all[name];
}

/**
 * The panel's HTML: rendered by ST (sanitised, localised) when it can, else fetched as is.
 * @param {string} templateUrl absolute URL of settings.html
 * @returns {Promise<string>}
 */
export async function renderTemplate(templateUrl) {
    const path = new URL(templateUrl).pathname; // /scripts/extensions/third-party/<folder>/st-extension/settings.html
    const match = path.match(/\/scripts\/extensions\/(.+)\/([^/]+)\.html$/);
    const render = stContext().renderExtensionTemplateAsync;
    if (match && typeof render === 'function') {
        try {
            const html = await render(match[1], match[2], {});
            if (html) return html; // ST returns nothing (after its own toast) when rendering fails
        } catch (error) {
            console.warn('[st-bridge] template render failed, loading it directly', error);
        }
    }
    const response = await fetch(templateUrl);
    return response.text();
}

// --- Advanced Formatting (instruct, context and reasoning presets) ---

/** ST's Text Completion checkbox "Add BOS token". */
const ADD_BOS = '#add_bos_token_textgenerationwebui';

/** @returns {{instruct: any, context: any}} ST's selected instruct and context settings */
export function currentFormatting() {
    const settings = stContext().powerUserSettings ?? {};
    return { instruct: settings.instruct, context: settings.context };
}

/** @returns {boolean} ST wraps the story string with the instruct preset's story_string_prefix/_suffix (1.13+) */
export function hasStoryAffixes() {
    return 'story_string_prefix' in (stContext().powerUserSettings?.instruct ?? {});
}

/**
 * Saves a preset under its name through ST's own preset manager, which also selects it.
 * @param {'instruct' | 'context' | 'reasoning'} kind
 * @param {{name: string}} preset
 */
export async function installPreset(kind, preset) {
    const manager = stContext().getPresetManager?.(kind);
    if (!manager) throw new Error(`this SillyTavern has no ${kind} templates`);
    await manager.savePreset(preset.name, preset);
}

/** Turns instruct mode on, as ST's own checkbox does. */
export function enableInstructMode() {
    if (stContext().powerUserSettings?.instruct?.enabled) return;
    $('#instruct_enabled').prop('checked', true).trigger('input');
}

/** Turns "Add BOS token" on: the bridge then adds the BOS token the model's template begins with. */
export function ensureAddBos() {
    const box = $(ADD_BOS);
    if (box.length && !box.prop('checked')) box.prop('checked', true).trigger('input');
}

/**
 * Calls `handler` when the user picks another instruct or context preset or edits one.
 * @param {() => void} handler
 */
export function onFormattingChanged(handler) {
    $(document).on('change input', '#instruct_presets, #context_presets, #instruct_enabled, '
        + '[id^="instruct_"], #context_story_string', handler);
}
