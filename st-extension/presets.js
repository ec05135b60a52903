// The bridge's prompt format (GET /bridge/v1/models/{id}/prompt-format) as the presets SillyTavern saves,
// and the comparison of ST's selected presets with the model's. Pure functions: no DOM, no ST imports, so
// the prompt-format tests run this same file in Node against ST's own prompt code.

/** Instruct fields that decide the prompt's text (the rest are ST's behaviour switches). */
export const INSTRUCT_TEXT_FIELDS = [
    'input_sequence', 'input_suffix', 'output_sequence', 'output_suffix', 'system_sequence', 'system_suffix',
    'first_input_sequence', 'first_output_sequence', 'last_input_sequence', 'last_output_sequence',
    'story_string_prefix', 'story_string_suffix', 'system_same_as_user', 'wrap', 'names_behavior',
];

/**
 * The presets to install in this SillyTavern. ST 1.13 and later wrap the story string with the instruct
 * preset's `story_string_prefix` / `story_string_suffix`; older releases (1.12) do not have them, so there
 * the wrapping becomes part of the context preset's story string.
 * @param {any} format the bridge's prompt format
 * @param {{storyAffixes: boolean}} options whether this ST has story_string_prefix / _suffix
 * @returns {{instruct: any, context: any, reasoning: any}}
 */
export function presetsForSillyTavern(format, { storyAffixes }) {
    const instruct = { ...format.instruct };
    const context = { ...format.context };
    if (!storyAffixes) {
        context.story_string = foldStoryString(instruct.story_string_prefix ?? '', context.story_string,
            instruct.story_string_suffix ?? '');
        delete instruct.story_string_prefix;
        delete instruct.story_string_suffix;
    }
    return { instruct, context, reasoning: format.reasoning ? { ...format.reasoning } : null };
}

/**
 * A story string with the system block's opening and closing written into it (for ST 1.12). The body ends
 * with ST's `{{trim}}`, which also eats the newlines right after it, so a closing that starts with a newline
 * goes after the body without `{{trim}}`: there each field ends with its own newline, and Handlebars drops
 * the newline that follows the body's last `{{/if}}` (a tag alone on its line), so exactly the closing's
 * newlines follow the last field.
 * @param {string} prefix
 * @param {string} body
 * @param {string} suffix
 * @returns {string}
 */
export function foldStoryString(prefix, body, suffix) {
    const literal = (text) => text.replaceAll('{{', '\\{{');
    if (suffix.startsWith('\n') && body.endsWith('{{/if}}{{trim}}')) {
        return literal(prefix) + body.slice(0, -'{{trim}}'.length) + literal(suffix);
    }
    return literal(prefix) + body + literal(suffix);
}

/**
 * How ST's selected presets differ from the model's: the instruct fields that differ, and whether the
 * story string does. Empty when ST writes the model's format.
 * @param {any} wanted the presets for this ST (presetsForSillyTavern)
 * @param {{instruct: any, context: any}} selected ST's power_user.instruct and power_user.context
 * @returns {string[]} names of the differing fields
 */
export function presetDifferences(wanted, selected) {
    const differing = [];
    if (!selected?.instruct?.enabled) differing.push('instruct_mode_off');
    for (const field of INSTRUCT_TEXT_FIELDS) {
        if (!(field in wanted.instruct)) continue;
        if ((selected?.instruct?.[field] ?? '') !== (wanted.instruct[field] ?? '')) differing.push(field);
    }
    if ((selected?.context?.story_string ?? '') !== wanted.context.story_string) differing.push('story_string');
    return differing;
}
