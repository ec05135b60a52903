// Stand-in for ST's utils.js: the three helpers instruct-mode.js imports, as ST defines them.
export function onlyUnique(value, index, array) {
    return array.indexOf(value) === index;
}
export function regexFromString(input) {
    try {
        const match = input.match(/(\/?)(.+)\1([a-z]*)/i);
        return new RegExp(match[2], match[3]);
    } catch {
        return null;
    }
}
export function resetScrollHeight() {}
