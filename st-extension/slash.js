// Slash commands. Each returns plain text so it can feed ST's pipes, e.g. `/bridge-status | /echo`.

import { describeCandidate, statusLine, verdictBadge } from './format.js';
import { stContext, toast } from './host.js';

/**
 * The classes ST registers commands with: in getContext() on 1.12.14 and later, imported on older builds.
 * @returns {Promise<{SlashCommand: any, SlashCommandArgument: any, SlashCommandNamedArgument: any,
 *   ARGUMENT_TYPE: any, SlashCommandParser: any} | null>}
 */
async function slashApi() {
    const context = stContext();
    if (context.SlashCommand && context.SlashCommandParser) return context;
    try {
        const [command, argument, parser] = await Promise.all([
            import('../../../../slash-commands/SlashCommand.js'),
            import('../../../../slash-commands/SlashCommandArgument.js'),
            import('../../../../slash-commands/SlashCommandParser.js'),
        ]);
        return { ...command, ...argument, ...parser };
    } catch (error) {
        console.warn('[st-bridge] slash commands are not available in this SillyTavern', error);
        return null;
    }
}

/**
 * Runs a command body; a failure is shown as a toast and returned as text for the pipe.
 * @param {() => Promise<string>} body
 * @returns {Promise<string>}
 */
async function answer(body) {
    try {
        return await body();
    } catch (error) {
        toast('error', error.message, 'st-bridge');
        return `error: ${error.message}`;
    }
}

/** @param {import('./controller.js').Controller} controller */
export async function registerSlashCommands(controller) {
    const api = await slashApi();
    if (!api) return;
    const { SlashCommand, SlashCommandArgument, SlashCommandNamedArgument, ARGUMENT_TYPE, SlashCommandParser } = api;
    const add = (/** @type {object} */ props) => SlashCommandParser.addCommandObject(SlashCommand.fromProps(props));

    add({
        name: 'bridge-status',
        callback: () => answer(async () => statusLine(await controller.client.status())),
        returns: 'the loaded model, quant, context and GPU layers, or why there is none',
        helpString: 'Says what the st-bridge server has loaded.',
    });
    add({
        name: 'bridge-load',
        callback: (/** @type {any} */ args, /** @type {string} */ model) => answer(async () => {
            if (!String(model || '').trim()) throw new Error('name a model: /bridge-load <model id>');
            const result = await controller.load(String(model).trim(), Number(args.ctx) || undefined);
            return statusLine(result?.status ?? await controller.client.status());
        }),
        namedArgumentList: [SlashCommandNamedArgument.fromProps({
            name: 'ctx', description: 'context size in tokens', typeList: [ARGUMENT_TYPE.NUMBER],
        })],
        unnamedArgumentList: [SlashCommandArgument.fromProps({
            description: 'model id (a GGUF file in the bridge\'s models folder, without .gguf)',
            typeList: [ARGUMENT_TYPE.STRING], isRequired: true,
        })],
        returns: 'the new status',
        helpString: 'Loads a model on the st-bridge server. Example: <code>/bridge-load ctx=16384 mistral-nemo-12b-Q5_K_M</code>',
    });
    add({
        name: 'bridge-quant',
        callback: (/** @type {any} */ _args, /** @type {string} */ quant) => answer(async () => {
            if (!String(quant || '').trim()) {
                return controller.quants.map((q) => `${q.quant}${q.local ? '' : ' (not downloaded)'}`).join(', ');
            }
            const result = await controller.switchQuant(String(quant).trim());
            return statusLine(result?.status ?? await controller.client.status());
        }),
        unnamedArgumentList: [SlashCommandArgument.fromProps({
            description: 'quant, e.g. Q4_K_M (empty: list the quants)', typeList: [ARGUMENT_TYPE.STRING],
        })],
        returns: 'the new status, or the list of quants',
        helpString: 'Switches the loaded model to another quant, keeping its context size.',
    });
    add({
        name: 'bridge-recommend',
        callback: (/** @type {any} */ args) => answer(async () => {
            const items = (await controller.recommend(Number(args.limit) || 5)).map(describeCandidate);
            if (!items.length) return 'nothing fits this machine';
            return items.map((c, i) => [`${i + 1}. ${c.name} ${c.quant}`, verdictBadge(c.verdict).label, c.speed, c.reason]
                .filter(Boolean).join(' — ')).join('\n');
        }),
        namedArgumentList: [SlashCommandNamedArgument.fromProps({
            name: 'limit', description: 'how many', typeList: [ARGUMENT_TYPE.NUMBER], defaultValue: '5',
        })],
        returns: 'the ranked list, one model per line',
        helpString: 'Lists the models and quants that fit this machine best.',
    });
}
