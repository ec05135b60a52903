// The bridge's management API (/bridge/v1) as seen from the browser: plain JSON calls with a timeout, and
// the event stream with automatic reconnection. Nothing in here touches SillyTavern or the DOM: when the
// calls travel through SillyTavern's server (route.js), the target says so and brings that server's headers.

import { proxiedUrl, proxyProblem } from './route.js';

const API_PREFIX = '/bridge/v1';
const DEFAULT_TIMEOUT_MS = 10000;
// Reconnect delays for the event stream: quick at first (a bridge restart takes a second or two), then
// backing off so a bridge that is gone for good costs one request every half minute.
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000, 30000];

/** A call to the bridge that failed; `status` is 0 when the bridge could not be reached at all. */
export class BridgeError extends Error {
    /**
     * @param {string} message
     * @param {number} status
     * @param {string} [code]
     */
    constructor(message, status, code = '') {
        super(message);
        this.name = 'BridgeError';
        this.status = status;
        this.code = code;
    }
}

/**
 * Removes trailing slashes and a trailing /v1 the way SillyTavern does (`trimV1`), so both agree on the URL.
 * @param {string} url
 * @returns {string}
 */
export function normalizeBaseUrl(url) {
    return String(url || '').trim().replace(/\/+$/, '').replace(/\/v1$/, '');
}

/**
 * @typedef {object} Target
 * @property {string} url the bridge, as whoever sends the calls reaches it
 * @property {string} apiKey
 * @property {{origin: string, headers: () => Record<string, string>} | null} proxy SillyTavern's server,
 *   when the calls travel through it (its origin and its request headers, CSRF token included)
 */

export class BridgeClient {
    /**
     * @param {() => Target} getTarget read on every call, so a changed URL, key or route applies at once
     */
    constructor(getTarget) {
        this.getTarget = getTarget;
    }

    /** @returns {string} */
    get baseUrl() {
        return normalizeBaseUrl(this.getTarget().url);
    }

    /** @returns {boolean} */
    get proxied() {
        return Boolean(this.getTarget().proxy);
    }

    /**
     * @param {string} path under /bridge/v1
     * @returns {string} the URL to fetch
     */
    urlFor(path) {
        const { proxy } = this.getTarget();
        const url = `${this.baseUrl}${API_PREFIX}${path}`;
        return proxy ? proxiedUrl(proxy.origin, url) : url;
    }

    /** @returns {Record<string, string>} */
    headers() {
        const { apiKey, proxy } = this.getTarget();
        if (!proxy) return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
        // SillyTavern's server may use Authorization itself (its basic auth): the key travels beside it.
        const headers = { ...proxy.headers() };
        delete headers['Content-Type'];
        if (apiKey) headers['X-API-Key'] = apiKey;
        return headers;
    }

    /**
     * @param {string} method
     * @param {string} path under /bridge/v1
     * @param {object} [body]
     * @param {{timeoutMs?: number, signal?: AbortSignal}} [options]
     * @returns {Promise<any>} the decoded JSON answer
     */
    async request(method, path, body = undefined, { timeoutMs = DEFAULT_TIMEOUT_MS, signal } = {}) {
        const url = this.urlFor(path);
        const headers = this.headers();
        // The bridge accepts changes only as JSON (a plain form post from any web page must not pass).
        if (method !== 'GET' && body === undefined) body = {};
        if (body !== undefined) headers['Content-Type'] = 'application/json';
        const timeout = AbortSignal.timeout(timeoutMs);
        const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
        let response;
        try {
            response = await fetch(url, {
                method, headers, signal: combined, body: body === undefined ? undefined : JSON.stringify(body),
            });
        } catch (error) {
            if (signal?.aborted) throw error;
            throw await this.unreachable(url, timeout.aborted ? timeoutMs : 0);
        }
        return decodeResponse(response, this.proxied ? this.baseUrl : '');
    }

    /**
     * Why a call got no answer: nothing listens, or something answers that this page may not read.
     * @param {string} url
     * @param {number} timedOutMs the timeout that ran out, or 0
     * @returns {Promise<BridgeError>}
     */
    async unreachable(url, timedOutMs) {
        const base = this.baseUrl;
        if (timedOutMs) return new BridgeError(`The bridge at ${base} gave no answer within ${timedOutMs / 1000} s.`, 0);
        if (!this.proxied && await answersOpaquely(url)) {
            return new BridgeError(`The bridge at ${base} answers, but this browser may not read its answers on `
                + `this page (${globalThis.location?.origin}). Start the bridge with `
                + `--allowed-origin ${globalThis.location?.origin}, or open SillyTavern on the bridge's machine.`, 0,
            'unreadable');
        }
        return new BridgeError(`The bridge at ${base} is not reachable. Is "st-bridge serve" running?`, 0);
    }

    /** @returns {Promise<boolean>} true when the bridge answers; used before asking ST to connect */
    async ping() {
        try {
            await this.request('GET', '/status', undefined, { timeoutMs: 3000 });
            return true;
        } catch {
            return false;
        }
    }

    status() { return this.request('GET', '/status'); }
    hardware() { return this.request('GET', '/hardware'); }
    models() { return this.request('GET', '/models'); }
    /** @param {number} [ctx] @param {number} [limit] */
    recommend(ctx, limit = 8) {
        const query = new URLSearchParams({ limit: String(limit) });
        if (ctx) query.set('ctx', String(ctx));
        return this.request('GET', `/recommend?${query}`, undefined, { timeoutMs: 60000 });
    }
    /** @param {string} modelId */
    quants(modelId) {
        return this.request('GET', `/models/${encodeURIComponent(modelId)}/quants`, undefined, { timeoutMs: 30000 });
    }
    /** @param {string} modelId */
    promptFormat(modelId) {
        return this.request('GET', `/models/${encodeURIComponent(modelId)}/prompt-format`);
    }
    /** @param {{model: string, ctx?: number}} body */
    load(body) { return this.request('POST', '/load', body, { timeoutMs: 600000 }); }
    unload() { return this.request('POST', '/unload'); }
    downloads() { return this.request('GET', '/downloads'); }
    /** @param {{repo: string, file: string}} body */
    startDownload(body) { return this.request('POST', '/downloads', body); }
    /** @param {string} id */
    cancelDownload(id) { return this.request('DELETE', `/downloads/${encodeURIComponent(id)}`); }
}

/**
 * @param {Response} response
 * @param {string} proxiedTo the bridge URL when the call went through SillyTavern's server, else ''
 * @returns {Promise<any>}
 */
async function decodeResponse(response, proxiedTo = '') {
    const text = await response.text();
    let data = null;
    try {
        data = text ? JSON.parse(text) : null;
    } catch {
        data = null;
    }
    if (response.ok && (data !== null || !proxiedTo)) return data;
    const problem = proxiedTo ? proxyProblem(response.status, text, proxiedTo) : '';
    if (problem) throw new BridgeError(problem, response.ok ? 502 : response.status, 'proxy');
    // The bridge's own error envelope is {"error": {"code", "message", "status"}}.
    const message = data?.error?.message || text.slice(0, 200) || response.statusText;
    throw new BridgeError(message || `HTTP ${response.status}`, response.status, data?.error?.code || '');
}

/**
 * Whether anything answers at `url` at all, even an answer this page may not read (CORS).
 * @param {string} url
 * @returns {Promise<boolean>}
 */
async function answersOpaquely(url) {
    try {
        await fetch(url, { mode: 'no-cors', signal: AbortSignal.timeout(3000) });
        return true;
    } catch {
        return false;
    }
}

/**
 * Follows GET /bridge/v1/events and reconnects with backoff whenever the stream ends.
 *
 * The stream is read with fetch rather than EventSource because EventSource cannot send an Authorization
 * header, which a bridge on another machine requires.
 */
export class EventStream {
    /**
     * @param {BridgeClient} client
     * @param {{onEvent: (name: string, data: any) => void, onConnection: (connected: boolean) => void,
     *   onRefused?: (message: string) => void}} handlers onRefused: the bridge answered the stream with an
     *   error (an origin it refuses, a missing key, SillyTavern's proxy turned off)
     */
    constructor(client, handlers) {
        this.client = client;
        this.handlers = handlers;
        this.controller = null;
        this.retryTimer = null;
        this.attempt = 0;
        this.connected = false;
    }

    start() {
        this.stop();
        this.controller = new AbortController();
        this.run(this.controller.signal);
    }

    stop() {
        clearTimeout(this.retryTimer);
        this.controller?.abort();
        this.controller = null;
        this.setConnected(false);
    }

    /** Reconnect now instead of waiting out the backoff (the user pressed something). */
    retryNow() {
        if (!this.connected) this.start();
    }

    /** @param {boolean} value */
    setConnected(value) {
        if (this.connected === value) return;
        this.connected = value;
        this.handlers.onConnection(value);
    }

    /** @param {AbortSignal} signal */
    async run(signal) {
        try {
            const response = await fetch(this.client.urlFor('/events'), {
                headers: { ...this.client.headers(), Accept: 'text/event-stream' }, signal,
            });
            if (!response.ok || !response.body) {
                const error = await decodeResponse(response, this.client.proxied ? this.client.baseUrl : '')
                    .then(() => new Error(`HTTP ${response.status}`), (refusal) => refusal);
                this.handlers.onRefused?.(error.message);
                throw error;
            }
            await this.read(response.body, signal);
        } catch (error) {
            if (signal.aborted) return;
            console.debug('[st-bridge] event stream ended:', error?.message || error);
        }
        if (signal.aborted) return;
        this.setConnected(false);
        const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
        this.attempt += 1;
        this.retryTimer = setTimeout(() => this.run(signal), delay);
    }

    /**
     * @param {ReadableStream<Uint8Array>} body
     * @param {AbortSignal} signal
     */
    async read(body, signal) {
        const reader = body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
            const { value, done } = await reader.read();
            if (done || signal.aborted) return;
            buffer += value.replace(/\r\n?/g, '\n');
            let end;
            while ((end = buffer.indexOf('\n\n')) >= 0) {
                const block = buffer.slice(0, end);
                buffer = buffer.slice(end + 2);
                this.dispatch(parseEventBlock(block));
            }
        }
    }

    /** @param {{name: string, data: any} | null} event */
    dispatch(event) {
        if (!event) return;
        // The first event of every connection is the snapshot, so only then is the bridge known to be back.
        this.attempt = 0;
        this.setConnected(true);
        try {
            this.handlers.onEvent(event.name, event.data);
        } catch (error) {
            console.error('[st-bridge] handling event', event.name, error);
        }
    }
}

/**
 * One SSE block ("event: x\ndata: {...}") as {name, data}; comments (keep-alives) give null.
 * @param {string} block
 * @returns {{name: string, data: any} | null}
 */
export function parseEventBlock(block) {
    let name = 'message';
    const dataLines = [];
    for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) dataLines.push(line.slice(5).replace(/^ /, ''));
    }
    if (!dataLines.length) return null;
    const text = dataLines.join('\n');
    try {
        return { name, data: JSON.parse(text) };
    } catch {
        return { name, data: text };
    }
}
