// The Text Completion prompt SillyTavern builds for a chat in instruct mode, computed by ST's own code.
//
//   node tests/st_prompt/assemble.mjs <ST package folder>  < cases.json  > results.json
//
// ST's prompt assembly lives in three places: public/scripts/instruct-mode.js (each message, the story
// string's wrapping and the reply's opening: imported here as it is, its browser-only imports replaced by
// ./stubs), renderStoryString in public/scripts/power-user.js (its source is cut out of ST's file and
// evaluated with ST's own Handlebars) and the order in which Generate() in public/script.js joins the
// pieces. That order sits inside one 800-line browser function, so it is restated in `assemble` below, line
// by line after ST 1.19.0's script.js (Generate: chat2 loop, arrMes, modifyLastPromptLine, combine) and
// 1.12.14's, for the case these tests build: a one-to-one chat, a normal reply, no examples, no injections.
// The browser tests drive real ST end to end for the same presets.
//
// Each case is {id, format?, presets?, story, chat: [{role, content}]}: `format` is the bridge's prompt
// format (converted for this ST release by the extension's own presets.js), `presets` a raw pair of ST
// presets {instruct, context} (ST's shipped ones). The answer is [{id, prompt, stops}] or {id, error}.

import { readFileSync } from 'node:fs';
import { createRequire, register } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

import { presetsForSillyTavern } from '../../st-extension/presets.js';

register('./hooks.mjs', import.meta.url);
// instruct-mode.js wires its settings panel on page load with `jQuery(() => ...)`: there is no page here.
globalThis.jQuery = globalThis.$ = () => undefined;

const stRoot = process.argv[2];
const scripts = join(stRoot, 'public', 'scripts');
const script = await import('./stubs/script.mjs');
const { power_user } = await import('./stubs/power-user.mjs');
const instructMode = await import(pathToFileURL(join(scripts, 'instruct-mode.js')).href);
const Handlebars = createRequire(join(stRoot, 'package.json'))('handlebars');
const renderStoryString = loadRenderStoryString();
const storyAffixes = readFileSync(join(scripts, 'instruct-mode.js'), 'utf8').includes('story_string_prefix');

/** ST's renderStoryString, evaluated from its own source with ST's Handlebars and `trim` helper. */
function loadRenderStoryString() {
    const macros = readFileSync(join(scripts, 'macros.js'), 'utf8');
    const helper = macros.match(/^Handlebars\.registerHelper\('trim'.*$/m);
    if (!helper) throw new Error('macros.js no longer registers the trim helper this harness expects');
    if (!macros.includes(String(script.TRIM_REGEX).replace(/gi$/, ''))) {
        throw new Error('macros.js changed its {{trim}} regex: update stubs/script.mjs');
    }
    new Function('Handlebars', helper[0])(Handlebars);
    const source = readFileSync(join(scripts, 'power-user.js'), 'utf8');
    const start = source.indexOf('export function renderStoryString(');
    const end = source.indexOf('\n}\n', start);
    if (start < 0 || end < 0) throw new Error('power-user.js has no renderStoryString');
    const body = source.slice(start + 'export '.length, end + 2);
    const make = new Function('Handlebars', 'power_user', 'extension_prompt_types', 'substituteParams',
        'validateStoryString', 'toastr', `${body}\nreturn renderStoryString;`);
    return make(Handlebars, power_user, script.extension_prompt_types, script.substituteParams, () => {}, {});
}

/** formatMessageHistoryItem() of script.js, for instruct mode. */
function formatItem(item, force) {
    const itemName = item.is_user ? item.name : (item.name || script.name2);
    const isNarrator = item.extra?.type === 'narrator';
    return instructMode.formatInstructModeChat(itemName, item.mes, item.is_user, isNarrator, item.force_avatar,
        script.name1, script.name2, force);
}

/** The prompt Generate() sends for a normal reply in instruct mode. */
function assemble(story, chat) {
    const FIRST = instructMode.force_output_sequence.FIRST;
    const LAST = instructMode.force_output_sequence.LAST;
    const params = { ...story, char: script.name2, user: script.name1 };
    if (!instructMode.formatInstructModeStoryString) {
        params.system = instructMode.formatInstructModeSystemPrompt(script.substituteParams(params.system));
    }
    const storyString = renderStoryString(params);
    const combinedStoryString = instructMode.formatInstructModeStoryString
        ? instructMode.formatInstructModeStoryString(storyString) : storyString;

    const coreChat = chat.map((m) => ({
        name: m.role === 'user' ? script.name1 : m.role === 'system' ? 'System' : script.name2,
        is_user: m.role === 'user', mes: m.content, extra: m.role === 'system' ? { type: 'narrator' } : {},
    }));
    const chat2 = [];
    const lastUserMessageIndex = coreChat.findLastIndex((x) => x.is_user);
    for (let i = coreChat.length - 1, j = 0; i >= 0; i--, j++) {
        chat2[i] = formatItem(coreChat[j], false);
        if (j === 0) chat2[i] = formatItem(coreChat[j], FIRST);
        if (lastUserMessageIndex >= 0 && j === lastUserMessageIndex) chat2[i] = formatItem(coreChat[j], LAST);
    }
    const arrMes = [...chat2];
    // The user alignment message goes before the chat when the oldest message is not the user's.
    const alignment = power_user.instruct.user_alignment_message;
    if (alignment && !coreChat[0]?.is_user) {
        arrMes.push(formatItem({ name: script.name1, mes: script.substituteParams(alignment), is_user: true }, FIRST));
    }
    arrMes.reverse();
    const mesSend = arrMes.map((item, i) => {
        if (i === arrMes.length - 1 && power_user.instruct.wrap) item = item.replace(/\n?$/, '');
        return item;
    });
    mesSend[mesSend.length - 1] += instructMode.formatInstructModePrompt(script.name2, false, '', script.name1,
        script.name2, false, false);
    return [combinedStoryString, '', mesSend.join(''), ''].join('').replace(/\r/gm, '');
}

function run(testCase) {
    const presets = testCase.presets ?? presetsForSillyTavern(testCase.format, { storyAffixes });
    power_user.instruct = { ...presets.instruct, enabled: true };
    power_user.context = { ...presets.context };
    const prompt = assemble(testCase.story, testCase.chat);
    const stops = instructMode.getInstructStoppingSequences({ customInstruct: power_user.instruct });
    return { id: testCase.id, prompt, stops, story_affixes: storyAffixes };
}

const cases = JSON.parse(readFileSync(0, 'utf8'));
const results = cases.map((testCase) => {
    try {
        return run(testCase);
    } catch (error) {
        return { id: testCase.id, error: String(error?.stack ?? error) };
    }
});
process.stdout.write(JSON.stringify(results));
