// "Recommend model": the ranked list from the bridge, each with its fit badge, reason and expected speed,
// a Download button (progress bar, cancel) and a Load button once the file is local.

import { ACTIVE_DOWNLOAD_STATES, describeCandidate, downloadProgress, verdictBadge } from './format.js';
import { toast } from './host.js';

const $p = (/** @type {string} */ id) => $(`#st_bridge_${id}`);

/** @param {import('./controller.js').Controller} controller */
export function wireRecommendations(controller) {
    $p('recommend').on('click', () => fetchRecommendations(controller));
    const list = $p('recommendations');
    list.on('click', '.st-bridge-download', function () {
        const item = controller.candidates[Number($(this).closest('[data-index]').data('index'))];
        if (!item) return;
        controller.download({ repo: item.repo, file: item.file })
            .catch((error) => toast('error', error.message, 'Download failed'));
    });
    list.on('click', '.st-bridge-cancel', function () {
        const id = String($(this).data('download'));
        controller.cancelDownload(id).catch((error) => toast('error', error.message, 'Cancel failed'));
    });
    list.on('click', '.st-bridge-load', function () {
        const id = String($(this).data('model'));
        controller.load(id).catch((error) => toast('error', error.message, 'Load failed'));
    });
}

/** @param {import('./controller.js').Controller} controller */
async function fetchRecommendations(controller) {
    controller.recommending = true;
    renderRecommendations(controller);
    try {
        const found = await controller.refreshRecommendations();
        if (!found) toast('info', 'The bridge found nothing that fits this machine.');
    } catch (error) {
        toast('error', error.message, 'Recommend model');
    } finally {
        controller.recommending = false;
        renderRecommendations(controller);
    }
}

/** @param {import('./controller.js').Controller} controller */
export function renderRecommendations(controller) {
    const list = $p('recommendations');
    if (controller.recommending) {
        list.empty().append($('<div class="st-bridge-details"></div>').text('Asking the bridge…'));
        return;
    }
    list.empty().append(controller.candidates.map((item, index) => renderCandidate(controller, item, index)));
}

/**
 * @param {import('./controller.js').Controller} controller
 * @param {ReturnType<typeof describeCandidate>} item
 * @param {number} index
 */
function renderCandidate(controller, item, index) {
    const badge = verdictBadge(item.verdict);
    const row = $('<div class="st-bridge-candidate"></div>').attr('data-index', index);
    const title = $('<div class="st-bridge-candidate-title"></div>')
        .append($('<b></b>').text(`${index + 1}. ${item.name}`))
        .append($('<span class="st-bridge-quant"></span>').text(item.quant))
        .append($(`<span class="st-bridge-badge st-bridge-${badge.cls}"></span>`).text(badge.label));
    const facts = [item.speed, item.wait, item.size].filter(Boolean).join(' · ');
    row.append(title);
    if (item.reason) row.append($('<div class="st-bridge-details"></div>').text(item.reason));
    if (facts) row.append($('<div class="st-bridge-details"></div>').text(facts));
    row.append(renderActions(controller, item));
    return row;
}

/**
 * Download / progress + cancel / Load, depending on where this file is.
 * @param {import('./controller.js').Controller} controller
 * @param {ReturnType<typeof describeCandidate>} item
 */
function renderActions(controller, item) {
    const actions = $('<div class="st-bridge-actions flex-container alignItemsCenter"></div>');
    const download = controller.downloadFor(item.repo, item.file);
    if (download && ACTIVE_DOWNLOAD_STATES.has(download.state)) {
        const { fraction, text } = downloadProgress(download);
        actions.append($('<div class="st-bridge-bar flex1"></div>')
            .append($('<div class="st-bridge-bar-fill"></div>').css('width', `${Math.round(fraction * 100)}%`)));
        actions.append($('<span class="st-bridge-progress-text"></span>').text(text));
        actions.append($('<div class="menu_button st-bridge-cancel">Cancel</div>').attr('data-download', download.id));
        return actions;
    }
    if (download?.state === 'failed') actions.append($('<span class="st-bridge-error"></span>').text(download.error ?? 'failed'));
    const localId = item.localId || (download?.state === 'done' ? controller.localModelOf(download) : '');
    if (localId) {
        actions.append($('<div class="menu_button st-bridge-load">Load</div>').attr('data-model', localId));
    } else if (item.repo && item.file) {
        actions.append($('<div class="menu_button st-bridge-download">Download</div>'));
    }
    return actions;
}
