// The settings panel: wires the inputs to the settings and the controller, and redraws from the
// controller's state whenever it changes. Every selector is scoped to the panel's own #st_bridge_ ids.

import { normalizeBaseUrl } from './api.js';
import { ACTIVE_DOWNLOAD_STATES, contextChoices, describeStatus, downloadProgress, formatBytes, hardwareLine, memoryRows,
    verdictBadge }
    from './format.js';
import { onOnlineStatusChanged, onlineStatus, toast } from './host.js';
import { renderPromptFormat, wirePromptFormat } from './prompt-format-panel.js';
import { renderRecommendations, wireRecommendations } from './recommend.js';
import { wireWorkers } from './workers.js';
import { wireCompanions } from './companions.js';
import { DEFAULT_SETTINGS, getApiKey, save, setApiKey } from './settings.js';

const $p = (/** @type {string} */ id) => $(`#st_bridge_${id}`);

/**
 * @param {import('./controller.js').Controller} controller
 */
export function wirePanel(controller) {
    const settings = controller.settings;
    $p('url').val(settings.url).on('change', function () {
        const url = normalizeBaseUrl(String($(this).val())) || DEFAULT_SETTINGS.url;
        $(this).val(url);
        if (url === normalizeBaseUrl(settings.url)) return;
        settings.url = url;
        save();
        controller.retarget();
    });
    $p('auto').prop('checked', settings.auto).on('change', function () {
        settings.auto = $(this).prop('checked');
        save();
        controller.followBridge();
    });
    $p('api_type').val(settings.apiType).on('change', function () {
        settings.apiType = /** @type {any} */ (String($(this).val()));
        save();
    });
    $p('docker').prop('checked', settings.docker).on('change', function () {
        settings.docker = $(this).prop('checked');
        save();
    });
    $p('route').val(settings.route).on('change', function () {
        settings.route = /** @type {any} */ (String($(this).val()));
        save();
        controller.retarget();
    });
    $p('api_key').val(getApiKey()).on('change', function () {
        setApiKey(String($(this).val()).trim());
        controller.retarget();
    });

    $p('connect').on('click', () => controller.useInSillyTavern());
    $p('unload').on('click', () => run(() => controller.unload(), 'Unload failed'));
    $p('apply_ctx').on('click', () => {
        if (!controller.status?.model) return toast('info', 'Load a model first.');
        run(() => controller.changeContext(Number($p('ctx').val())), 'Load failed');
    });
    $p('quants').on('click', '.st-bridge-chip[data-id]', function () {
        const id = String($(this).data('id'));
        run(() => controller.load(id, controller.status?.n_ctx || undefined), 'Load failed');
    });
    $p('quants').on('click', '.st-bridge-chip[data-file]', function () {
        const what = { repo: String($(this).data('repo')), file: String($(this).data('file')) };
        run(() => controller.download(what), 'Download failed');
    });
    wireRecommendations(controller);
    wirePromptFormat(controller);
    wireWorkers(controller);
    wireCompanions(controller);

    controller.subscribe(() => render(controller));
    onOnlineStatusChanged(() => renderSillyTavernState(controller));
    render(controller);
}

/**
 * Runs a panel action; failures become a toast instead of an unhandled rejection.
 * @param {() => Promise<any>} action
 * @param {string} title
 */
async function run(action, title) {
    try {
        await action();
    } catch (error) {
        toast('error', error.message, title);
    }
}

/** @param {import('./controller.js').Controller} controller */
function render(controller) {
    renderLink(controller);
    renderRoute(controller);
    $p('hardware').text(hardwareLine(controller.hardware));
    renderModel(controller);
    renderQuants(controller);
    renderContext(controller);
    renderSillyTavernState(controller);
    renderPromptFormat(controller);
    renderRecommendations(controller);
}

/** @param {import('./controller.js').Controller} controller */
function renderRoute(controller) {
    const through = controller.route() === 'sillytavern';
    $p('route_state').text(through ? 'The panel\'s calls go through SillyTavern\'s server.' : '');
}

/** @param {import('./controller.js').Controller} controller */
function renderLink(controller) {
    const state = controller.linkUp ? describeStatus(controller.status).state : 'offline';
    const text = { ready: 'ready', loading: 'loading…', empty: 'no model', error: 'error', offline: 'offline' }[state] ?? state;
    $p('link').attr('data-state', state).text(text);
    $p('header_state').attr('data-state', state).attr('title', `bridge: ${text}`);
}

/** @param {import('./controller.js').Controller} controller */
function renderModel(controller) {
    const info = describeStatus(controller.status);
    $p('model_name').text(info.model || (controller.linkUp ? 'none loaded' : '—'));
    $p('model_details').text(info.details);
    const progress = controller.loadProgress;
    $p('load_progress').prop('hidden', !progress);
    if (progress) {
        const percent = Math.round((progress.fraction || 0) * 100);
        $p('load_progress').find('.st-bridge-bar-fill').css('width', `${percent}%`);
        $p('load_progress').find('.st-bridge-progress-text').text(`loading ${progress.model ?? ''} ${percent}%`);
    }
    $p('error').prop('hidden', !controller.lastError).text(controller.lastError);
    renderMemory(controller.status?.state === 'ready' ? controller.status.plan : null);
    const hint = controller.status?.state === 'empty' ? controller.status.hint : '';
    if (hint && !controller.lastError) $p('model_details').text(hint);
}

/**
 * Planned beside allocated memory per device, updated in place: one row per device.
 * @param {any} plan
 */
function renderMemory(plan) {
    const rows = plan ? memoryRows(plan) : [];
    const table = $p('memory');
    table.prop('hidden', rows.length === 0);
    const body = table.find('tbody');
    body.children().slice(rows.length).remove();
    rows.forEach((row, i) => {
        let tr = body.children().eq(i);
        if (!tr.length) {
            tr = $('<tr><td></td><td></td><td></td></tr>').appendTo(body);
        }
        const cells = tr.children();
        cells.eq(0).text(row.label);
        cells.eq(1).text(formatBytes(row.planned * 1024 ** 2));
        cells.eq(2).text(row.actual === null ? '—' : formatBytes(row.actual * 1024 ** 2));
        tr.toggleClass('st-bridge-off', row.off).attr('data-device', row.device);
    });
}

/** @param {import('./controller.js').Controller} controller */
function renderQuants(controller) {
    const loaded = controller.status?.model;
    const chips = controller.quants.map((q) => {
        const badge = verdictBadge(q.verdict);
        const chip = $('<div class="st-bridge-chip menu_button"></div>').toggleClass('active', q.id === loaded);
        chip.append($('<span class="st-bridge-chip-quant"></span>').text(q.quant));
        if (q.verdict) chip.append($(`<span class="st-bridge-badge st-bridge-${badge.cls}"></span>`).text(badge.label));
        if (q.id) return chip.attr({ 'data-id': q.id, title: `load ${q.id}` });
        const download = controller.downloadFor(q.repo, q.file);
        if (download && ACTIVE_DOWNLOAD_STATES.has(download.state)) {
            const percent = Math.round(downloadProgress(download).fraction * 100);
            return chip.addClass('disabled').append($('<span class="st-bridge-progress-text"></span>').text(`${percent}%`));
        }
        return chip.addClass('st-bridge-remote').attr({ 'data-repo': q.repo, 'data-file': q.file, title: `download ${q.file}` });
    });
    $p('quants').empty().append(chips);
}

/** @param {import('./controller.js').Controller} controller */
function renderContext(controller) {
    const status = controller.status;
    const entry = controller.models.find((m) => m.id === status?.model);
    const fitsUpTo = Number(status?.plan?.max_ctx ?? entry?.fit?.max_ctx ?? 0);
    const choices = contextChoices(Number(entry?.n_ctx_train || 0), Number(status?.n_ctx || 0), fitsUpTo);
    const select = $p('ctx');
    const chosen = Number(select.val()) || Number(status?.n_ctx || 0);
    const current = select.children().map((_, o) => `${o.value}:${o.textContent}`).get().join();
    const wanted = choices.map((c) => `${c.value}:${c.label}`).join();
    if (current !== wanted) {
        select.empty().append(choices.map((c) => $('<option></option>').val(c.value).text(c.label)));
    }
    select.val(String(chosen));
}

/** @param {import('./controller.js').Controller} controller */
function renderSillyTavernState(controller) {
    const status = onlineStatus();
    let text = status === 'no_connection' ? 'SillyTavern: not connected' : `SillyTavern: connected to ${status}`;
    if (controller.connecting) text = 'SillyTavern: connecting…';
    $p('st_state').text(text);
    $p('connect').toggleClass('disabled', Boolean(controller.connecting));
}
