// The companions beside the chat model: the embedding model (SillyTavern's Vector Storage and Data Bank)
// and the chat model's vision projector (SillyTavern's Caption extension). Shows what is loaded, its size
// and whether it fits, lets the user pick or drop each, and in one click points Vector Storage and Caption
// at the bridge. Rows are updated in place when the bridge's status or companions change.

import { urlForSillyTavern } from './connect.js';
import { formatBytes } from './format.js';
import { TEXTGEN_TYPES, atLeast, saveSettings, sillyTavernVersion, stContext, toast } from './host.js';

const $p = (/** @type {string} */ id) => $(`#st_bridge_${id}`);

/** @param {import('./controller.js').Controller} controller */
export function wireCompanions(controller) {
    /** @type {{data: any, key: string}} */
    const state = { data: null, key: '' };
    const refresh = async () => {
        try {
            state.data = await controller.client.request('GET', '/companions', undefined, { timeoutMs: 30000 });
        } catch (error) {
            console.warn('[st-bridge] companions:', error.message);
            state.data = null;
        }
        renderCompanions(state.data);
    };
    controller.subscribe((what) => {
        const status = controller.status;
        const key = `${controller.linkUp}|${status?.state}|${status?.model}|${JSON.stringify(status?.companions ?? null)}`;
        if (what === 'companions' || ((what === 'link' || what === 'status') && key !== state.key)) {
            state.key = key;
            refresh();
        }
    });
    $p('embedding_pick').on('change', async function () {
        const model = String($(this).val() ?? '');
        await act(controller, model ? 'POST' : 'DELETE', '/companions/embedding', model ? { model } : undefined,
            'Embedding model');
        refresh();
    });
    $p('vision_pick').on('change', async function () {
        const projector = String($(this).val() ?? 'auto');
        await act(controller, 'POST', '/companions/vision', { projector }, 'Vision');
        refresh();
    });
    $p('companions_setup').on('click', async () => {
        const url = urlForSillyTavern(controller.settings.url, controller.settings.docker);
        const done = await pointSillyTavernAt(url);
        toast('success', `${done.join(' and ')} now use the bridge at ${url}.`, 'st-bridge');
    });
}

/**
 * @param {import('./controller.js').Controller} controller
 * @param {string} method
 * @param {string} path
 * @param {object | undefined} body
 * @param {string} title
 */
async function act(controller, method, path, body, title) {
    try {
        await controller.client.request(method, path, body, { timeoutMs: 600000 });
    } catch (error) {
        toast('error', error.message, title);
    }
}

/**
 * ST releases from 1.13 on ask a KoboldCpp source for its model's name before reading their index; older
 * ones read it without the name and never find what they stored, so they vectorise the chat for ever.
 */
const KOBOLD_VECTORS_SINCE = [1, 13, 0];

/**
 * One click: Vector Storage's source KoboldCpp where ST can use it (its index is then scoped by the
 * embedding model's name, so a swap never mixes two models' vectors), else llama.cpp, and Caption's
 * multimodal source KoboldCpp, both on the bridge's URL as their own endpoint, whatever the chat
 * connection is.
 *
 * Vector Storage works on its own copy of its settings, which only its controls' handlers update: each is
 * set through its control, as a user would. Caption reads ST's extension settings directly. ST 1.12's Caption
 * has no endpoint of its own and takes ST's KoboldCpp server URL, which is then set to the bridge too.
 * @param {string} url the bridge as SillyTavern's server reaches it
 * @returns {Promise<string[]>} what was set
 */
export async function pointSillyTavernAt(url) {
    const all = stContext().extensionSettings;
    const done = [];
    if ($('#vectors_source').length) {
        const source = atLeast(await sillyTavernVersion(), KOBOLD_VECTORS_SINCE) ? 'koboldcpp' : 'llamacpp';
        $('#vectors_source').val(source).trigger('change');
        $('#vector_altEndpointUrl_enabled').prop('checked', true).trigger('input');
        $('#vector_altEndpoint_address').val(url).trigger('change');
        done.push(`Vector Storage (source ${source === 'koboldcpp' ? 'KoboldCpp' : 'llama.cpp'})`);
    }
    all.caption ??= {};
    Object.assign(all.caption, { source: 'multimodal', multimodal_api: 'koboldcpp', multimodal_model: 'koboldcpp_current' });
    // Through Caption's controls too, so its panel shows the blocks for that source.
    $('#caption_source').val('multimodal').trigger('change');
    $('#caption_multimodal_api').val('koboldcpp').trigger('change');
    $('#caption_multimodal_model').val('koboldcpp_current').trigger('change');
    all.caption.multimodal_model = 'koboldcpp_current'; // when the control is missing, the change did nothing
    if ($('#caption_altEndpoint_url').length) {
        $('#caption_altEndpoint_enabled').prop('checked', true).trigger('input');
        $('#caption_altEndpoint_url').val(url).trigger('input');
        Object.assign(all.caption, { alt_endpoint_enabled: true, alt_endpoint_url: url });
    } else {
        $(TEXTGEN_TYPES.koboldcpp.url).val(url).trigger('input');
    }
    done.push('Captions');
    saveSettings();
    return done;
}

/** @param {any} data */
function renderCompanions(data) {
    const embedding = data?.embedding;
    const vision = data?.vision;
    const local = data?.local ?? { embedding: [], projectors: [] };
    setOptions($p('embedding_pick'), [['', 'none'], ...local.embedding.map((/** @type {any} */ e) =>
        [e.id, `${e.id} (${formatBytes(e.size_bytes)}${e.fits ? '' : ', does not fit'})`])], embedding?.model ?? '');
    setOptions($p('vision_pick'), [['auto', 'the one beside the model'], ['off', 'none'],
        ...local.projectors.map((/** @type {any} */ p) => [p.id, `${p.id} (${formatBytes(p.size_bytes)})`])],
        vision?.choice ?? 'auto');
    $p('embedding_state').text(describeEmbedding(embedding)).attr('data-state', embedding?.state ?? 'empty');
    $p('vision_state').text(describeVision(vision)).attr('data-state', vision?.projector ? 'ready' : 'empty');
}

/**
 * @param {JQuery} select
 * @param {string[][]} options [value, label]
 * @param {string} selected
 */
function setOptions(select, options, selected) {
    const wanted = options.map(([value]) => value).join('\n');
    if (select.data('values') !== wanted) {
        select.empty();
        for (const [value, label] of options) select.append($('<option></option>').val(value).text(label));
        select.data('values', wanted);
    }
    if (!select.is(':focus')) select.val(selected);
}

/** @param {any} embedding */
export function describeEmbedding(embedding) {
    if (!embedding || embedding.state === 'empty') return 'no embedding model';
    if (embedding.state !== 'ready') return embedding.error ?? embedding.state;
    const plan = embedding.plan;
    const size = plan ? `, ${Math.round(plan.total_mib)} MiB in ${plan.device === 'CPU' ? 'RAM' : plan.device}` : '';
    return `${embedding.model}: ${embedding.dimensions} dimensions, ${embedding.pooling} pooling${size}`;
}

/** @param {any} vision */
export function describeVision(vision) {
    if (vision?.projector) {
        const plan = vision.plan;
        const size = plan ? `, ${Math.round(plan.total_mib)} MiB in ${plan.device === 'CPU' ? 'RAM' : plan.device}` : '';
        return `sees images with ${vision.projector}${size}`;
    }
    return vision?.note ?? 'the chat model sees no images';
}
