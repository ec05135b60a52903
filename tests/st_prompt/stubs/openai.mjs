// Stand-in for ST's openai.js: example dialogues are not part of these prompts.
export function parseExampleIntoIndividual() {
    return [];
}
