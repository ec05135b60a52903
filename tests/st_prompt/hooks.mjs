// Node module hooks: when SillyTavern's instruct-mode.js is imported outside the browser, its imports of
// ST's browser-only modules resolve to the small stand-ins in ./stubs/ (what they hold is listed there).
// Every other import, and instruct-mode.js itself, is ST's own file.

const STUBS = {
    '../script.js': 'script.mjs',
    './group-chats.js': 'group-chats.mjs',
    './openai.js': 'openai.mjs',
    './power-user.js': 'power-user.mjs',
    './utils.js': 'utils.mjs',
};

export async function resolve(specifier, context, nextResolve) {
    const parent = context.parentURL ?? '';
    if (parent.endsWith('/public/scripts/instruct-mode.js') && STUBS[specifier]) {
        return { url: new URL(`./stubs/${STUBS[specifier]}`, import.meta.url).href, shortCircuit: true };
    }
    return nextResolve(specifier, context);
}
