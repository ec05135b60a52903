// How this browser reaches the bridge: directly, or through SillyTavern's own server.
//
// A bridge URL on loopback (http://127.0.0.1:5001) means "the machine SillyTavern runs on" only while this
// page is open on that machine too. Opened from a phone or another PC (SillyTavern's `listen: true`), the
// page's loopback is the phone itself, so the panel's calls go through SillyTavern's server instead: its
// CORS proxy (`/proxy/<url>`, config.yaml `enableCorsProxy: true`) forwards them to the bridge as
// SillyTavern's server reaches it. The bridge stays on loopback; nothing new listens on the network.

const LOOPBACK_NAMES = new Set(['localhost', '127.0.0.1', '[::1]', '::1']);
const PROXY_PREFIX = '/proxy/';

/** @typedef {'auto' | 'direct' | 'sillytavern'} RouteSetting */

/**
 * @param {string} hostname a URL's hostname (IPv6 with or without brackets)
 * @returns {boolean}
 */
export function isLoopbackHost(hostname) {
    const name = String(hostname || '').toLowerCase();
    return LOOPBACK_NAMES.has(name) || name.endsWith('.localhost') || /^127\.\d+\.\d+\.\d+$/.test(name);
}

/**
 * @param {RouteSetting} setting the panel's "Reach the bridge" choice
 * @param {string} pageUrl this page's URL (location.href)
 * @param {string} bridgeUrl the bridge URL in the panel
 * @returns {'direct' | 'sillytavern'}
 */
export function chooseRoute(setting, pageUrl, bridgeUrl) {
    if (setting === 'direct' || setting === 'sillytavern') return setting;
    let pageHost = '';
    let bridgeHost = '';
    try {
        pageHost = new URL(pageUrl).hostname;
        bridgeHost = new URL(bridgeUrl).hostname;
    } catch {
        return 'direct';
    }
    return !isLoopbackHost(pageHost) && isLoopbackHost(bridgeHost) ? 'sillytavern' : 'direct';
}

/**
 * The address of `targetUrl` through SillyTavern's CORS proxy. The whole URL is one encoded path segment,
 * so its query string reaches the bridge too (Express would keep a plain `?` for itself).
 * @param {string} pageOrigin SillyTavern's origin (location.origin)
 * @param {string} targetUrl
 * @returns {string}
 */
export function proxiedUrl(pageOrigin, targetUrl) {
    return `${pageOrigin}${PROXY_PREFIX}${encodeURIComponent(targetUrl)}`;
}

/**
 * What a failed call through SillyTavern's proxy means, or '' when the answer is the bridge's own.
 * @param {number} status
 * @param {string} text the answer's body
 * @param {string} bridgeUrl the URL SillyTavern's server was asked to reach
 * @returns {string}
 */
export function proxyProblem(status, text, bridgeUrl) {
    if (status === 404 && /CORS proxy is disabled/i.test(text)) {
        return 'This page was opened from another device, so the panel reaches the bridge through '
            + 'SillyTavern\'s server, whose proxy is off. Set enableCorsProxy: true in SillyTavern\'s '
            + 'config.yaml (or start it with --corsProxy true) and restart SillyTavern.';
    }
    if (status >= 500 && !/"error"\s*:/.test(text)) {
        return `SillyTavern's server could not reach the bridge at ${bridgeUrl}. Is "st-bridge serve" `
            + 'running on the machine SillyTavern runs on?';
    }
    return '';
}
