// Stand-in for ST's public/script.js: the names instruct-mode.js imports (1.12 and 1.19).
// substituteParams does what ST's macro engine does to the texts these tests feed it: {{trim}} (the regex
// of ST's public/scripts/macros.js, which assemble.mjs checks is still ST's) and the user/char names.

export const extension_prompt_types = { NONE: -1, IN_PROMPT: 0, IN_CHAT: 1, BEFORE_PROMPT: 2 };
export let name1 = 'User';
export let name2 = 'Seraphina';
export const online_status = 'no_connection';
export function saveSettingsDebounced() {}

export const TRIM_REGEX = /(?:\r?\n)*{{trim}}(?:\r?\n)*/gi;

export function substituteParams(content) {
    if (!content) return content ?? '';
    return String(content)
        .replace(/{{user}}/gi, name1)
        .replace(/{{char}}/gi, name2)
        .replace(TRIM_REGEX, '');
}
