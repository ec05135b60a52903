// The panel's "Prompt format" section: the loaded model's format (from its template, or a guess), whether
// SillyTavern's selected presets write it, and a button to switch ST to it. Updated in place.

import { toast } from './host.js';

const $p = (/** @type {string} */ id) => $(`#st_bridge_${id}`);

/** Field names of presets.js's comparison, as a person reads them. */
const FIELD_LABELS = {
    instruct_mode_off: 'instruct mode is off',
    story_string: 'story string',
    story_string_prefix: 'system prompt opening',
    story_string_suffix: 'system prompt closing',
    input_sequence: 'user sequence',
    input_suffix: 'user suffix',
    output_sequence: 'assistant sequence',
    output_suffix: 'assistant suffix',
    last_output_sequence: 'reply opening',
    first_output_sequence: 'greeting opening',
};

/** @param {import('./controller.js').Controller} controller */
export function wirePromptFormat(controller) {
    $p('format_apply').on('click', async () => {
        const model = controller.status?.model;
        if (!model) return toast('info', 'Load a model first.');
        const done = await controller.promptFormat.install(model);
        if (done) toast('success', `SillyTavern now writes ${controller.promptFormat.format?.name ?? 'the model\'s format'}.`);
    });
}

/** @param {import('./controller.js').Controller} controller */
export function renderPromptFormat(controller) {
    const sync = controller.promptFormat;
    const format = controller.status?.state === 'ready' ? sync.format : null;
    $p('format_section').prop('hidden', !format && !sync.error);
    $p('format_name').text(format?.name ?? '');
    $p('format_source').text(format ? sourceText(format) : '');
    const differs = Boolean(format) && sync.differences.length > 0;
    $p('format_state')
        .attr('data-state', differs ? 'differs' : 'same')
        .text(sync.error || (format ? stateText(sync.differences) : ''));
    $p('format_apply').prop('hidden', !differs);
}

/** @param {any} format */
function sourceText(format) {
    const origin = format.source === 'guess'
        ? `Guessed: ${format.guess_reason}.`
        : 'From the model\'s own chat template.';
    const inexact = (format.inexact ?? []).map((i) => `Not exact: ${i.detail}.`).join(' ');
    return [origin, inexact].filter(Boolean).join(' ');
}

/** @param {string[]} differences */
function stateText(differences) {
    if (!differences.length) return 'SillyTavern writes this format.';
    const fields = differences.map((d) => FIELD_LABELS[d] ?? d.replaceAll('_', ' ')).join(', ');
    return `SillyTavern's selected templates differ from the model's (${fields}).`;
}
