// Other machines lending their GPU or CPU to the bridge (`st-bridge worker`): their state, adding one by
// its address, forgetting one. The list is read again when the bridge's status changes (a load, a swap, a
// worker lost mid-reply) and after each change made here.

import { toast } from './host.js';

const $p = (/** @type {string} */ id) => $(`#st_bridge_${id}`);

/** @param {import('./controller.js').Controller} controller */
export function wireWorkers(controller) {
    /** @type {{workers: any[], key: string}} */
    const state = { workers: [], key: '' };
    const refresh = async () => {
        try {
            const answer = await controller.client.request('GET', '/workers');
            state.workers = answer?.workers ?? [];
        } catch (error) {
            console.warn('[st-bridge] workers:', error.message);
        }
        renderWorkers(state.workers);
    };
    controller.subscribe((what) => {
        const status = controller.status;
        const key = `${controller.linkUp}|${status?.state}|${status?.model}|${JSON.stringify(status?.plan?.placement ?? null)}`;
        if ((what === 'link' || what === 'status') && key !== state.key) {
            state.key = key;
            refresh();
        }
    });
    $p('worker_add').on('click', async () => {
        const address = String($p('worker_address').val() ?? '').trim();
        if (!address) return;
        try {
            const added = await controller.client.request('POST', '/workers', { address });
            if (added?.state === 'ready') {
                toast('success', `${address} is ready: load the model again to use it.`, 'Worker added');
                $p('worker_address').val('');
            } else {
                toast('warning', added?.message ?? `${address} is not ready`, 'Worker added');
            }
        } catch (error) {
            toast('error', error.message, 'Add worker');
        }
        refresh();
    });
    $p('workers').on('click', '.st-bridge-worker-remove', async function () {
        const address = String($(this).closest('[data-address]').data('address'));
        try {
            await controller.client.request('DELETE', `/workers/${encodeURIComponent(address)}`);
        } catch (error) {
            toast('error', error.message, 'Remove worker');
        }
        refresh();
    });
}

/**
 * One row per worker, updated in place.
 * @param {any[]} workers
 */
function renderWorkers(workers) {
    const list = $p('workers');
    list.children().filter((_, el) => !workers.some((w) => w.address === $(el).data('address'))).remove();
    workers.forEach((worker, index) => {
        let row = list.children(`[data-address="${CSS.escape(worker.address)}"]`);
        if (!row.length) {
            row = $(`<div class="st-bridge-worker flex-container alignItemsCenter">
                <span class="st-bridge-worker-address"></span>
                <span class="st-bridge-badge st-bridge-worker-state"></span>
                <span class="st-bridge-worker-devices st-bridge-details flex1"></span>
                <div class="menu_button st-bridge-worker-remove" title="Forget this worker">✕</div>
            </div>`).attr('data-address', worker.address);
            list.append(row);
        }
        if (row.index() !== index) list.children().eq(index).before(row);
        const state = worker.in_use ? 'in use' : worker.state;
        row.find('.st-bridge-worker-address').text(worker.address);
        row.find('.st-bridge-worker-state').text(state).attr('data-state', worker.state);
        row.find('.st-bridge-worker-devices').text(describeDevices(worker));
        row.attr('title', worker.message ?? '');
    });
}

/**
 * @param {any} worker
 * @returns {string}
 */
function describeDevices(worker) {
    if (worker.state !== 'ready') return worker.message ?? '';
    const devices = (worker.devices ?? []).map((/** @type {any} */ d) =>
        `${d.kind === 'cpu' ? 'CPU' : 'GPU'} ${d.description} · ${(d.free_mib / 1024).toFixed(1)} GB`);
    const rtt = worker.rtt_ms == null ? '' : ` · ${worker.rtt_ms.toFixed(1)} ms`;
    return devices.join(', ') + rtt;
}
