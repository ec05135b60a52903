// Pure helpers that turn the bridge's JSON into the words and numbers the panel and slash commands show.
// No DOM, no SillyTavern: each takes data and returns text.

const QUANT_PATTERN = /[-_.]((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)$/i;
const K = 1024;

/** Fit verdicts of the planner → badge text and CSS modifier. */
export const VERDICTS = {
    full_gpu: { label: 'Full GPU', cls: 'good' },
    partial_gpu: { label: 'Partial GPU', cls: 'ok' },
    cpu_only: { label: 'CPU only', cls: 'slow' },
    wont_fit: { label: "Won't fit", cls: 'bad' },
};

/** Download states in which a download still runs (it can be cancelled). */
export const ACTIVE_DOWNLOAD_STATES = new Set(['queued', 'running', 'verifying']);

/** Context sizes offered in the panel. */
export const CONTEXT_CHOICES = [2048, 4096, 8192, 12288, 16384, 24576, 32768, 65536, 131072];

/**
 * The quant named at the end of a model id: "mistral-nemo-12b-Q5_K_M" → "Q5_K_M".
 * @param {string} name
 * @returns {string}
 */
export function quantOf(name) {
    return String(name || '').match(QUANT_PATTERN)?.[1]?.toUpperCase() ?? '';
}

/**
 * The model id without its quant: the key shared by all quants of one model.
 * @param {string} name
 * @returns {string}
 */
export function baseOf(name) {
    return String(name || '').replace(QUANT_PATTERN, '');
}

/**
 * @param {number} tokens
 * @returns {string} "16k", "12k", "3000"
 */
export function formatCtx(tokens) {
    const n = Number(tokens) || 0;
    return n >= K && n % K === 0 ? `${n / K}k` : String(n);
}

/**
 * @param {number} bytes
 * @returns {string} "4.1 GB", "512 MB"
 */
export function formatBytes(bytes) {
    const n = Number(bytes) || 0;
    if (n >= K ** 3) return `${(n / K ** 3).toFixed(n >= 10 * K ** 3 ? 0 : 1)} GB`;
    if (n >= K ** 2) return `${(n / K ** 2).toFixed(n >= 10 * K ** 2 ? 0 : 1)} MB`;
    return `${Math.round(n / K)} KB`;
}

/**
 * @param {string | undefined} verdict
 * @returns {{label: string, cls: string}}
 */
export function verdictBadge(verdict) {
    return VERDICTS[verdict ?? ''] ?? { label: verdict || 'unknown', cls: 'unknown' };
}

/**
 * The hardware in one line; the bridge sends `summary`, older bridges only the fields.
 * @param {any} hw GET /hardware
 * @returns {string}
 */
export function hardwareLine(hw) {
    if (!hw) return '';
    if (hw.summary) return hw.summary;
    const gpus = (hw.gpus ?? []).map((g) => `${g.name} ${(g.total_mib / K).toFixed(1)} GB`).join(' + ') || 'No NVIDIA GPU';
    const ram = `${(hw.ram_total_mib / K).toFixed(0)} GB RAM (${(hw.ram_available_mib / K).toFixed(0)} GB free)`;
    const cores = hw.cpu?.cores_physical ? `${hw.cpu.cores_physical} cores` : '';
    return [gpus, ram, cores].filter(Boolean).join(' · ');
}

/**
 * The loaded model as the panel and /bridge-status describe it.
 * @param {any} status GET /status
 * @returns {{state: string, model: string, quant: string, nCtx: number, gpuLayers: number, details: string}}
 */
export function describeStatus(status) {
    const state = status?.state ?? 'offline';
    const model = status?.model || status?.model_id || '';
    const plan = status?.plan ?? {};
    const nCtx = Number(status?.n_ctx || plan.n_ctx || 0);
    const gpuLayers = Number(status?.n_gpu_layers ?? plan.n_gpu_layers ?? 0);
    const quant = quantOf(model);
    const parts = [];
    if (quant) parts.push(quant);
    if (nCtx) parts.push(`${formatCtx(nCtx)} context`);
    parts.push(`${gpuLayers} GPU layers`);
    if (status?.kv_type) parts.push(`KV ${status.kv_type}`);
    const memory = memoryText(plan);
    if (memory) parts.push(memory);
    return { state, model, quant, nCtx, gpuLayers, details: model ? parts.join(' · ') : '' };
}

/**
 * The memory the load plan gives the model: its `devices` are the GPUs, then the host ("CPU"), each with
 * `total_mib`.
 * @param {any} plan
 * @returns {string}
 */
function memoryText(plan) {
    const devices = Array.isArray(plan?.devices) ? plan.devices : [];
    const mib = (/** @type {any[]} */ list) => list.reduce((sum, d) => sum + (Number(d.total_mib) || 0), 0);
    const vram = mib(devices.filter((d) => d.device !== 'CPU'));
    const ram = mib(devices.filter((d) => d.device === 'CPU'));
    const parts = [];
    if (vram) parts.push(`${formatBytes(vram * K ** 2)} VRAM`);
    if (ram) parts.push(`${formatBytes(ram * K ** 2)} RAM`);
    return parts.join(' + ');
}

/**
 * Memory per device: what the plan gave each device beside what llama.cpp allocated there after the load
 * (weights + KV cache + compute buffers, in MiB). `off` marks a difference the bridge logged (over 5% or
 * 64 MiB).
 * @param {any} plan status.plan
 * @returns {{device: string, label: string, planned: number, actual: number|null, off: boolean}[]}
 */
export function memoryRows(plan) {
    const planned = plan?.planned ?? {};
    const actual = plan?.actual?.devices ?? {};
    const off = new Set((plan?.differences ?? []).map((/** @type {any} */ d) => d.device));
    const labels = new Map((plan?.devices ?? []).map((/** @type {any} */ d) => [d.device, d.label]));
    const names = [...new Set([...Object.keys(planned), ...Object.keys(actual)])];
    return names.map((device) => {
        const p = planned[device] ?? {};
        const a = actual[device];
        const total = Number(p.weights_mib || 0) + Number(p.kv_mib || 0) + Number(p.compute_mib || 0);
        const label = device === 'CPU' ? 'RAM' : (labels.get(device) ? `${device} · ${labels.get(device)}` : device);
        return { device, label, planned: total, actual: a ? Number(a.total_mib || 0) : null, off: off.has(device) };
    });
}

/**
 * One line for /bridge-status and the toast after a reconnect.
 * @param {any} status
 * @returns {string}
 */
export function statusLine(status) {
    const { state, model, details } = describeStatus(status);
    if (state === 'ready') return `${model} (${details})`;
    if (state === 'loading') return `loading ${model}…`;
    if (state === 'error') return `error: ${status?.error || 'the model failed to load'}`;
    if (state === 'offline') return 'the bridge is not reachable';
    return status?.hint || 'no model loaded';
}

/**
 * "Now using tiny-llama Q4_K_M, 16k context"
 * @param {any} status
 * @returns {string}
 */
export function nowUsingText(status) {
    const { model, quant, nCtx } = describeStatus(status);
    const short = model.split('/').pop() ?? model; // downloaded models live under owner/repo/
    const name = quant ? `${baseOf(short)} ${quant}` : short;
    return `Now using ${name}, ${formatCtx(nCtx)} context`;
}

/**
 * Context sizes to offer: up to what the model was trained for, each flagged with whether it fits.
 * @param {number} trained the model's training context (0: unknown)
 * @param {number} current the loaded n_ctx
 * @param {number} fitsUpTo the largest context the planner says fits (0: unknown)
 * @returns {{value: number, label: string}[]}
 */
export function contextChoices(trained, current, fitsUpTo) {
    const limit = trained || Math.max(...CONTEXT_CHOICES);
    const values = new Set(CONTEXT_CHOICES.filter((n) => n <= limit));
    if (current) values.add(current);
    return [...values].sort((a, b) => a - b).map((value) => {
        let label = formatCtx(value);
        if (fitsUpTo) label += value <= fitsUpTo ? ' (fits)' : ' (too big)';
        return { value, label };
    });
}

/**
 * A recommendation as the panel shows it (an entry of GET /recommend's `candidates`).
 * @param {any} item
 * @returns {{key: string, name: string, quant: string, repo: string, file: string, localId: string | null,
 *   verdict: string, reason: string, speed: string, wait: string, size: string}}
 */
export function describeCandidate(item) {
    const file = String(item.file ?? '');
    const repo = String(item.repo ?? '');
    const sizeBytes = item.size_bytes ?? (item.size_mib ? item.size_mib * K * K : 0);
    return {
        key: `${repo}/${file}`,
        name: item.name ?? (repo.split('/').pop() || file).replace(/-GGUF$/i, ''),
        quant: item.quant ?? quantOf(file.replace(/\.gguf$/i, '')),
        repo,
        file,
        localId: item.local_id ?? null, // set when this file is already in the bridge's models folder
        verdict: item.verdict ?? item.fit?.verdict ?? '',
        reason: item.reason ?? item.fit?.reason ?? '',
        speed: item.expected_tok_s ? `~${Math.round(item.expected_tok_s)} tok/s` : '',
        // a new chat (or the chat after a swap) reads the whole context before the first word
        wait: item.first_reply_s ? `first reply ${formatWait(item.first_reply_s)} at ${formatCtx(item.n_ctx)}` : '',
        size: sizeBytes ? formatBytes(sizeBytes) : '',
    };
}

/**
 * A wait as a person says it, as the bridge's reasons do: "~4 s", "~2 min", "~1.5 h".
 * @param {number} seconds
 * @returns {string}
 */
export function formatWait(seconds) {
    if (seconds < 1) return `~${seconds.toFixed(1)} s`;
    if (seconds < 90) return `~${Math.round(seconds)} s`;
    if (seconds < 5400) return `~${Math.round(seconds / 60)} min`;
    return `~${(seconds / 3600).toFixed(1)} h`;
}

/**
 * @param {any} answer GET /recommend: a list, or an object holding one
 * @returns {any[]}
 */
export function candidateList(answer) {
    if (Array.isArray(answer)) return answer;
    return answer?.candidates ?? answer?.recommendations ?? answer?.items ?? [];
}

/**
 * Download progress as text: "1.2 GB of 4.1 GB · 35 MB/s · 1 min left".
 * @param {any} d a download (`download_progress` event data, or an entry of GET /downloads)
 * @returns {{fraction: number, text: string}}
 */
export function downloadProgress(d) {
    const done = Number(d.bytes_done ?? 0);
    const total = Number(d.bytes_total ?? 0);
    const fraction = total ? Math.min(1, done / total) : 0;
    const parts = [total ? `${formatBytes(done)} of ${formatBytes(total)}` : formatBytes(done)];
    if (d.rate_bps) parts.push(`${formatBytes(d.rate_bps)}/s`);
    const eta = Number(d.eta_s ?? 0);
    if (eta) parts.push(eta >= 90 ? `${Math.round(eta / 60)} min left` : `${Math.round(eta)} s left`);
    return { fraction, text: parts.join(' · ') };
}
