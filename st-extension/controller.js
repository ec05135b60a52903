// The extension's state and decisions: what the bridge reports (from its event stream), and when to point
// SillyTavern at it again. The panel and the slash commands only call into this and re-render on change.

import { BridgeClient, EventStream, normalizeBaseUrl } from './api.js';
import { connectSillyTavern, urlForSillyTavern } from './connect.js';
import { baseOf, candidateList, describeCandidate, nowUsingText, quantOf } from './format.js';
import { isOnline, mainApi, maxContext, onlineStatus, serverUrl, setMaxContext, stRequestHeaders, textgenType, toast }
    from './host.js';
import { chooseRoute } from './route.js';
import { PromptFormatSync } from './prompt-format.js';
import { getApiKey, save } from './settings.js';

/**
 * The identity of a ready model for reconnect decisions: a new name or a new context means ST must
 * connect again (its model name and context size would be stale); anything else does not.
 * @param {any} status
 * @returns {string | null}
 */
export function readyKey(status) {
    return status?.state === 'ready' && status.model ? `${status.model}|${status.n_ctx}` : null;
}

export class Controller {
    /** @param {import('./settings.js').BridgeSettings} settings */
    constructor(settings) {
        this.settings = settings;
        this.client = new BridgeClient(() => this.target());
        this.stream = new EventStream(this.client, {
            onEvent: (name, data) => this.onEvent(name, data),
            onConnection: (connected) => this.onConnection(connected),
            onRefused: (message) => this.onRefused(message),
        });
        this.linkUp = false; // the event stream is open
        this.status = null; // the last GET /status (or `status` event)
        this.hardware = null;
        this.models = []; // local models, GET /models
        this.quants = []; // the loaded model's quants: {id, quant, verdict, local, repo, file, size_bytes}
        this.quantsUnknown = new Set(); // models whose repository the bridge does not know
        this.quantsTurn = 0; // refreshQuants calls so far: an older one finishing late changes nothing
        this.loadProgress = null; // {model, fraction} while a model loads
        this.downloads = new Map(); // id -> last progress event
        this.candidates = []; // the last "Recommend model" list, as describeCandidate() gives it
        this.recommending = false;
        this.lastError = '';
        this.refusal = ''; // why the bridge refused the event stream, while it does
        this.connectedKey = null; // readyKey() of the model ST was last connected to
        this.connecting = null; // the running connect, so two triggers never overlap
        this.lastConnectFailed = false;
        this.reconnects = 0; // how many times ST was (re)connected; shown in the panel
        /** @type {Set<(what: string) => void>} */
        this.listeners = new Set();
        // The loaded model's prompt format and whether ST's selected presets write it (prompt-format.js).
        this.promptFormat = new PromptFormatSync(this.client, () => this.emit('format'));
    }

    start() {
        this.stream.start();
    }

    /** @returns {'direct' | 'sillytavern'} how this browser reaches the bridge now (route.js) */
    route() {
        return chooseRoute(this.settings.route, globalThis.location?.href ?? '', this.settings.url);
    }

    /**
     * Where the panel's calls go: the bridge itself, or SillyTavern's server, which reaches the bridge at
     * the URL it uses for generation (host.docker.internal when it runs in Docker).
     * @returns {import('./api.js').Target}
     */
    target() {
        if (this.route() === 'direct') return { url: this.settings.url, apiKey: getApiKey(), proxy: null };
        return {
            url: urlForSillyTavern(this.settings.url, this.settings.docker),
            apiKey: getApiKey(),
            proxy: { origin: globalThis.location.origin, headers: stRequestHeaders },
        };
    }

    /** The URL or key changed: drop what the old bridge said and follow the new one. */
    retarget() {
        if (this.refusal) this.lastError = '';
        this.refusal = '';
        this.status = null;
        this.hardware = null;
        this.connectedKey = null;
        this.emit('status');
        this.stream.start();
    }

    /** @param {(what: string) => void} listener */
    subscribe(listener) {
        this.listeners.add(listener);
    }

    /** @param {string} what */
    emit(what) {
        for (const listener of this.listeners) listener(what);
    }

    // --- the event stream ---

    /** @param {boolean} connected */
    onConnection(connected) {
        this.linkUp = connected;
        if (connected) {
            if (this.refusal) this.lastError = '';
            this.refusal = '';
            this.refreshHardware();
            this.refreshModels();
        } else {
            this.loadProgress = null;
        }
        this.emit('link');
    }

    /**
     * The bridge (or SillyTavern's server on its way) answered the event stream with an error: say why in
     * the panel, instead of a bare "offline".
     * @param {string} message
     */
    onRefused(message) {
        if (message === this.refusal) return;
        this.refusal = message;
        this.lastError = message;
        this.emit('status');
    }

    /**
     * @param {string} name
     * @param {any} data
     */
    onEvent(name, data) {
        const handler = EVENT_HANDLERS[name];
        if (handler) handler(this, data ?? {});
    }

    /** @param {any} status */
    applyStatus(status) {
        const modelChanged = status?.model !== this.status?.model;
        this.status = status;
        this.loadProgress = status?.state === 'loading'
            ? { model: status.model, fraction: Number(status.load_progress || 0) } : null;
        if (status?.state !== 'error') this.lastError = '';
        else this.lastError = status.error || 'the model failed to load';
        if (modelChanged) this.refreshQuants();
        this.promptFormat.fetch(readyKey(status) ? status.model : '');
        this.emit('status');
        this.followBridge();
    }

    // --- keeping SillyTavern connected ---

    /** @returns {boolean} ST is set up to use this bridge (pressed "Use" once, or its URL points here) */
    isLinked() {
        if (this.settings.linked) return true;
        if (mainApi() !== 'textgenerationwebui') return false;
        const expected = urlForSillyTavern(this.settings.url, this.settings.docker);
        return normalizeBaseUrl(serverUrl(textgenType())) === expected;
    }

    /** After each status: reconnect ST once per newly ready model, when automatic mode is on. */
    async followBridge() {
        const key = readyKey(this.status);
        if (!key || this.connecting || !this.settings.auto || !this.isLinked()) return;
        // Same model as last time: nothing to do, unless ST dropped the connection (and the last try worked,
        // so a failing setup is not retried on every event).
        if (key === this.connectedKey && (isOnline() || this.lastConnectFailed)) return;
        if (this.connectedKey === null && isOnline() && onlineStatus() === this.status.model) {
            // ST connected by itself (its auto-connect on page load): only the context size may be stale.
            this.connectedKey = key;
            if (maxContext() !== this.status.n_ctx) await setMaxContext(this.status.n_ctx);
            await this.promptFormat.install(this.status.model);
            return;
        }
        await this.useInSillyTavern({ automatic: true });
        // A swap that finished while ST was connecting: follow it too (the key check makes this once).
        if (readyKey(this.status) !== this.connectedKey) this.followBridge();
    }

    /**
     * "Use in SillyTavern": check the bridge answers, then set ST's connection and wait until it is online.
     * @param {{automatic?: boolean}} [options]
     * @returns {Promise<{online: boolean, model: string, error?: string}>}
     */
    useInSillyTavern({ automatic = false } = {}) {
        this.connecting ??= this.connect(automatic).finally(() => {
            this.connecting = null;
            this.emit('st');
        });
        return this.connecting;
    }

    /**
     * @param {boolean} automatic
     * @returns {Promise<{online: boolean, model: string, error?: string}>}
     */
    async connect(automatic) {
        let status;
        try {
            status = await this.client.status(); // ST 1.12 hangs on a dead backend: never send it to one
        } catch (error) {
            if (!automatic) toast('error', error.message, 'Cannot reach the bridge');
            return { online: false, model: '', error: error.message };
        }
        this.status = status;
        this.connectedKey = readyKey(status);
        this.emit('st');
        const result = await connectSillyTavern({
            url: this.settings.url,
            type: this.settings.apiType,
            inDocker: this.settings.docker,
            apiKey: getApiKey(),
            nCtx: status.state === 'ready' ? status.n_ctx : null,
        });
        // ST writes the model's own prompt format from now on (on "Use", and on each swap when automatic).
        if (result.online && status.state === 'ready') await this.promptFormat.install(status.model);
        this.reconnects += 1;
        this.lastConnectFailed = !result.online;
        this.settings.linked = true;
        save();
        this.announce(status, result.online, automatic);
        return result;
    }

    /**
     * @param {any} status
     * @param {boolean} online
     * @param {boolean} automatic
     */
    announce(status, online, automatic) {
        if (!online) {
            toast('warning', 'SillyTavern did not come online. Check the bridge URL (and the Docker setting).');
        } else if (status.state === 'ready') {
            toast('success', nowUsingText(status));
        } else if (!automatic) {
            toast('info', 'No model is loaded yet; SillyTavern reconnects when one is ready.');
        }
    }

    // --- actions on the bridge ---

    /**
     * @param {string} model
     * @param {number} [ctx]
     */
    load(model, ctx) {
        return this.sendLoad(ctx ? { model, ctx } : { model }, model);
    }

    /**
     * The loaded file again with another context. The bridge knows which file is loaded; its id would not
     * do, as a file served from outside the models folder (`serve --model /elsewhere/x.gguf`) has none.
     * @param {number} ctx
     */
    changeContext(ctx) {
        return this.sendLoad({ ctx }, this.status?.model ?? '');
    }

    /**
     * @param {{model?: string, ctx?: number}} body POST /load
     * @param {string} model what the panel shows as loading meanwhile
     */
    async sendLoad(body, model) {
        this.lastError = '';
        this.loadProgress = { model, fraction: 0 };
        this.emit('status');
        try {
            return await this.client.load(body);
        } catch (error) {
            this.lastError = error.message;
            this.loadProgress = null;
            this.emit('status');
            throw error;
        }
    }

    /**
     * Switches the loaded model to another quant, keeping its context size.
     * @param {string} quant e.g. "Q4_K_M"
     */
    async switchQuant(quant) {
        const wanted = String(quant).toUpperCase();
        const target = this.quants.find((q) => q.quant.toUpperCase() === wanted && q.id);
        if (!target) {
            const known = this.quants.filter((q) => q.id).map((q) => q.quant).join(', ') || 'none';
            throw new Error(`no local ${wanted} of ${baseOf(this.status?.model ?? '')} (local quants: ${known})`);
        }
        return this.load(target.id, this.status?.n_ctx || undefined);
    }

    async unload() {
        this.status = await this.client.unload();
        this.emit('status');
    }

    async refreshHardware() {
        try {
            this.hardware = await this.client.hardware();
        } catch (error) {
            console.warn('[st-bridge] hardware:', error.message);
        }
        this.emit('hardware');
    }

    async refreshModels() {
        try {
            const answer = await this.client.models();
            this.models = answer?.models ?? [];
        } catch (error) {
            console.warn('[st-bridge] models:', error.message);
        }
        await this.refreshQuants();
    }

    /**
     * The loaded model's quants: the bridge's list (local and downloadable, with verdicts) when it knows
     * the model's repository, merged with the local files of the same model under another quant.
     */
    async refreshQuants() {
        const model = this.status?.model;
        const turn = ++this.quantsTurn;
        let remote = [];
        if (model && !this.quantsUnknown.has(model)) {
            try {
                const answer = await this.client.quants(model);
                if (answer?.repo === null) this.quantsUnknown.add(model); // from no known repository
                remote = (answer?.quants ?? []).map(normalizeQuant);
            } catch (error) {
                this.quantsUnknown.add(model); // not from a known repository: do not ask again
                console.info('[st-bridge] quants:', error.message);
            }
        }
        // A refresh started later knows newer models (or another loaded model): its answer stands.
        if (turn !== this.quantsTurn) return;
        const local = model ? localSiblings(this.models, model) : [];
        this.quants = mergeQuants(remote, local);
        this.emit('quants');
    }

    /** @param {number} [limit] */
    async recommend(limit = 8) {
        const answer = await this.client.recommend(undefined, limit);
        return candidateList(answer);
    }

    /**
     * Ranks again and replaces the "Recommend model" list; the old list stays on screen until then.
     * @returns {Promise<number>} how many candidates the list now holds
     */
    async refreshRecommendations() {
        this.candidates = (await this.recommend()).map(describeCandidate);
        this.emit('recommendations');
        return this.candidates.length;
    }

    /**
     * @param {{repo: string, file: string}} what
     * @returns {Promise<string>} the download's id
     */
    async download(what) {
        const started = await this.client.startDownload(what);
        this.downloads.set(started.id, { state: 'queued', files: [what.file], ...started });
        this.emit('downloads');
        return started.id;
    }

    /** @param {string} id */
    async cancelDownload(id) {
        await this.client.cancelDownload(id);
    }

    /**
     * The latest download of `file` from `repo`, if any.
     * @param {string} repo
     * @param {string} file
     */
    downloadFor(repo, file) {
        let found = null;
        for (const d of this.downloads.values()) {
            if (d.repo === repo && (d.files ?? []).includes(file)) found = d;
        }
        return found;
    }

    /**
     * The local model a finished download became (the id the bridge gave it: a split model's id has no
     * shard part), or '' while the bridge does not list it yet.
     * @param {{model_id?: string}} download
     */
    localModelOf(download) {
        const id = download?.model_id ?? '';
        return id && this.models.some((m) => m.id === id) ? id : '';
    }
}

/**
 * @param {any} q
 * @returns {{id: string, quant: string, verdict: string, local: boolean, repo: string, file: string,
 *   size_bytes: number}}
 */
function normalizeQuant(q) {
    return {
        id: q.local_id ?? (q.local ? q.id : '') ?? '',
        quant: q.quant ?? quantOf(q.id ?? q.file ?? ''),
        verdict: q.verdict ?? q.fit?.verdict ?? '',
        local: Boolean(q.local ?? q.local_id),
        repo: q.repo ?? '',
        file: q.file ?? '',
        size_bytes: q.size_bytes ?? 0,
    };
}

/**
 * The bridge's quants in its order. Where a file of the same name family as the loaded model holds that
 * quant (e.g. copied into the models folder by hand), its id wins, so the loaded model's own chip is the
 * active one even when a downloaded copy exists too; local quants the bridge does not list are added.
 * @param {ReturnType<typeof normalizeQuant>[]} remote
 * @param {ReturnType<typeof normalizeQuant>[]} local
 */
function mergeQuants(remote, local) {
    const byQuant = new Map(local.map((q) => [q.quant, q]));
    const merged = remote.map((q) => (byQuant.has(q.quant) ? { ...q, id: byQuant.get(q.quant).id, local: true } : q));
    const listed = new Set(merged.map((q) => q.quant));
    return [...merged, ...local.filter((q) => !listed.has(q.quant))];
}

/**
 * @param {any[]} models GET /models entries
 * @param {string} loaded the loaded model's id
 */
function localSiblings(models, loaded) {
    const base = baseOf(loaded);
    return models
        .filter((m) => baseOf(m.id) === base)
        .map((m) => ({
            id: m.id,
            quant: m.quant || quantOf(m.id),
            verdict: m.fit?.verdict ?? '',
            local: true,
            repo: '',
            file: m.file ?? '',
            size_bytes: m.size_bytes ?? 0,
        }));
}

/** What each bridge event does; several names are accepted for the same moment. */
const EVENT_HANDLERS = {
    status: (c, data) => c.applyStatus(data),
    load_started: (c, data) => {
        c.loadProgress = { model: data.model, fraction: 0 };
        c.emit('status');
    },
    load_progress: (c, data) => {
        c.loadProgress = { model: data.model ?? c.loadProgress?.model, fraction: Number(data.progress ?? data.value ?? 0) };
        c.emit('status');
    },
    model_loaded: (c) => c.refreshModels(),
    model_unloaded: (c) => c.refreshModels(),
    download_progress: (c, data) => {
        c.downloads.set(data.id, data);
        c.emit('downloads');
    },
    download_done: (c, data) => {
        c.downloads.set(data.id, data);
        c.refreshModels(); // the new file is a local model now: its Load button needs the id
    },
    catalog_updated: (c) => {
        // The list on screen was ranked from the old catalog; rank again only if the user has it open.
        if (!c.candidates.length || c.recommending) return;
        c.refreshRecommendations().catch((error) => console.warn('[st-bridge] recommend:', error.message));
    },
    error: (c, data) => {
        c.lastError = data.message ?? String(data);
        c.emit('status');
    },
};
// The companions (companions.js): what runs beside the chat model changed; a new embedding model means
// SillyTavern's vectors must be built again.
EVENT_HANDLERS.companions = (c) => c.emit('companions');
EVENT_HANDLERS.embedding_model_changed = (c, data) => {
    toast('warning', data.message ?? 'The embedding model changed: vectorize the chats again.', 'Vector Storage');
    c.emit('companions');
};
EVENT_HANDLERS.loading = EVENT_HANDLERS.load_progress;
EVENT_HANDLERS.ready = EVENT_HANDLERS.model_loaded;
EVENT_HANDLERS.download_error = EVENT_HANDLERS.download_progress;
EVENT_HANDLERS.download_cancelled = EVENT_HANDLERS.download_progress;
// A file added to or removed from the models folder: the models list, and the companions' (an embedding
// model or a projector may be what came or went).
EVENT_HANDLERS.models_changed = (c) => {
    c.refreshModels();
    c.emit('companions');
};
