// Stand-in for ST's group-chats.js: a one-to-one chat (no group selected).
export const selected_group = null;
