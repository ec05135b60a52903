// Stand-in for ST's power-user.js: the settings object ST's functions read (filled by assemble.mjs).
export const power_user = { instruct: {}, context: {}, sysprompt: { enabled: true } };
export const context_presets = [];
