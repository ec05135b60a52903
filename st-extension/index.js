// st-bridge for SillyTavern: a panel to run local models through the st-bridge server, and the code that
// keeps SillyTavern's connection pointed at it. Loading this module only registers things; the work starts
// when SillyTavern's page is ready.

import { Controller } from './controller.js';
import { renderTemplate } from './host.js';
import { wirePanel } from './panel.js';
import { loadSettings } from './settings.js';
import { registerSlashCommands } from './slash.js';

const TEMPLATE_URL = new URL('settings.html', import.meta.url).href;

/** @returns {Promise<Controller>} */
async function init() {
    const settings = loadSettings();
    const controller = new Controller(settings);
    $('#extensions_settings2').append(await renderTemplate(TEMPLATE_URL));
    wirePanel(controller);
    await registerSlashCommands(controller);
    controller.start();
    return controller;
}

/**
 * The running controller, once SillyTavern's page is ready. Nothing is put on `window`: the browser
 * console and the end-to-end tests reach it with `(await import(<this module's URL>)).started`.
 * @type {Promise<Controller>}
 */
export const started = new Promise((resolve) => {
    jQuery(() => {
        init().then(resolve, (error) => console.error('[st-bridge] failed to start', error));
    });
});
