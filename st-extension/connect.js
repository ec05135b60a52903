// Points SillyTavern's Text Completion connection at the bridge and waits until ST is online.
//
// The steps follow ST's own handlers (see st-integration.md B.3): each field is set through its input so
// ST saves it; changing the type makes ST click Connect by itself, otherwise Connect is clicked once here.
// Nothing is ever clicked in a loop.

import { API_TOKENIZER, ST_IDS, TEXTGEN_TYPES, isConnecting, isOnline, mainApi, onlineStatus, setMaxContext,
    textgenType } from './host.js';
import { normalizeBaseUrl } from './api.js';

const ONLINE_TIMEOUT_MS = 20000;
const POLL_MS = 100;
const DOCKER_HOST = 'host.docker.internal';

/**
 * The URL SillyTavern's server uses to reach the bridge. The browser always talks to the bridge at `url`;
 * when ST runs in Docker its server cannot reach the host's loopback, so it gets host.docker.internal.
 * @param {string} url
 * @param {boolean} inDocker
 * @returns {string}
 */
export function urlForSillyTavern(url, inDocker) {
    const base = normalizeBaseUrl(url);
    if (!inDocker) return base;
    const parsed = new URL(base);
    if (['127.0.0.1', 'localhost', '[::1]'].includes(parsed.hostname)) parsed.hostname = DOCKER_HOST;
    return normalizeBaseUrl(parsed.toString());
}

/**
 * @typedef {object} ConnectOptions
 * @property {string} url the bridge URL as the browser reaches it
 * @property {'koboldcpp' | 'llamacpp'} type ST's Text Completion type to use
 * @property {boolean} inDocker SillyTavern's server runs in Docker
 * @property {string} apiKey handed to ST's API key field for that type (empty: left as it is)
 * @property {number | null} nCtx the bridge's context size, pushed into ST (null: left as it is)
 */

/**
 * Sets ST's connection to the bridge and waits for ST to report a model.
 * The caller has already checked that the bridge answers: ST 1.12 can hang on a dead backend.
 * @param {ConnectOptions} options
 * @returns {Promise<{online: boolean, model: string}>}
 */
export async function connectSillyTavern({ url, type, inDocker, apiKey, nCtx }) {
    const fields = TEXTGEN_TYPES[type];
    if (!fields) throw new Error(`unknown connection type ${type}`);

    if (mainApi() !== 'textgenerationwebui') {
        $(ST_IDS.mainApi).val('textgenerationwebui').trigger('change');
    }
    $(fields.url).val(urlForSillyTavern(url, inDocker)).trigger('input');
    if (apiKey) $(fields.key).val(apiKey).trigger('input');
    setChecked(ST_IDS.streaming, true);
    if (String($(ST_IDS.tokenizer).val()) !== API_TOKENIZER) $(ST_IDS.tokenizer).val(API_TOKENIZER).trigger('change');

    await waitUntil(() => !isConnecting(), ONLINE_TIMEOUT_MS); // a check already running would swallow ours
    if (textgenType() !== type) {
        $(ST_IDS.textgenType).val(type).trigger('change'); // ST connects by itself when the type changes
    } else {
        $(ST_IDS.connectButton).trigger('click');
    }
    // The click starts the check at once, so wait for it to finish, then for the status it leaves.
    await delay(POLL_MS);
    const online = await waitUntil(() => !isConnecting() && isOnline(), ONLINE_TIMEOUT_MS);
    if (online && nCtx) await setMaxContext(nCtx);
    return { online, model: onlineStatus() };
}

/**
 * @param {string} selector
 * @param {boolean} value
 */
function setChecked(selector, value) {
    const box = $(selector);
    if (box.prop('checked') === value) return;
    box.prop('checked', value).trigger('input'); // ST saves textgen checkboxes on 'input'
}

/**
 * @param {() => boolean} condition
 * @param {number} timeoutMs
 * @returns {Promise<boolean>} whether the condition came true in time
 */
async function waitUntil(condition, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
        if (condition()) return true;
        await delay(POLL_MS);
    }
    return condition();
}

/** @param {number} ms */
function delay(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}
