// The extension's settings: kept in SillyTavern's extension_settings (saved in settings.json), except the
// API key, which stays in this browser's localStorage because settings.json is no place for secrets.

import { extensionSettings, saveSettings } from './host.js';

export const MODULE_NAME = 'st_bridge';
const API_KEY_STORAGE = 'st-bridge.apiKey';

/**
 * @typedef {object} BridgeSettings
 * @property {string} url the bridge as this browser reaches it
 * @property {boolean} auto reconnect SillyTavern by itself when the bridge loads another model
 * @property {'koboldcpp' | 'llamacpp'} apiType the Text Completion type ST uses for the bridge
 * @property {boolean} docker SillyTavern's server runs in Docker (it reaches the bridge another way)
 * @property {import('./route.js').RouteSetting} route how this browser reaches the bridge: directly, through
 *   SillyTavern's server, or 'auto' (through it when this page was opened from another device)
 * @property {boolean} linked "Use in SillyTavern" was pressed once: automatic reconnects may follow
 */

/** @type {BridgeSettings} */
export const DEFAULT_SETTINGS = {
    url: 'http://127.0.0.1:5001',
    auto: true,
    apiType: 'koboldcpp',
    docker: false,
    route: 'auto',
    linked: false,
};

/** @returns {BridgeSettings} the live settings object (changes are saved with `save()`) */
export function loadSettings() {
    return extensionSettings(MODULE_NAME, DEFAULT_SETTINGS);
}

export function save() {
    saveSettings();
}

/** @returns {string} */
export function getApiKey() {
    return globalThis.localStorage?.getItem(API_KEY_STORAGE) ?? '';
}

/** @param {string} key */
export function setApiKey(key) {
    if (key) globalThis.localStorage?.setItem(API_KEY_STORAGE, key);
    else globalThis.localStorage?.removeItem(API_KEY_STORAGE);
}
