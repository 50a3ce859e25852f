// Grantline's hosted Connect UI (served at /connect/ by src/http/connect_ui.rs).
//
// The connect session's token arrives in the address (`?session_token=`, the session's
// connect_link), which is then cleaned with history.replaceState, or from the parent window when
// `@nangohq/frontend`'s openConnectUI frames the page: the page posts {type:'ready'}, the parent
// answers {type:'session_token', sessionToken}. With the token as a bearer the page reads
// GET /connect/session, GET /integrations and GET /providers/:provider, lists what the session
// allows and connects the chosen one: OAuth in a popup whose outcome comes over the WebSocket
// (`ws_client_id`) or, failing that, from the callback page's message; API keys, logins and
// client credentials through a form. The parent hears {type:'connect', payload:{providerConfigKey,
// connectionId}}, {type:'error', payload:{errorType, errorMessage}} and {type:'close'}.
//
// The token lives in this closure only: never in the page, the console or any storage. Every
// text from the server goes into the page as text (textContent), never as markup.
'use strict';

(function () {
    const query = new URLSearchParams(window.location.search);
    const framed = window.parent !== window;
    const detectClosedWindow = query.get('detectClosedAuthWindow') === 'true';
    /** How long a framed page waits for its parent's token. */
    const TOKEN_WAIT_MS = 10000;
    /** How long the popup waits for the WebSocket's id before it goes without one. */
    const SOCKET_WAIT_MS = 3000;

    /** How each auth mode connects. */
    const MODES = {
        OAUTH2: { kind: 'oauth', hint: 'Sign in with your account' },
        OAUTH1: { kind: 'oauth', hint: 'Sign in with your account' },
        API_KEY: {
            kind: 'form',
            hint: 'API key',
            path: '/api-auth/api-key/',
            intro: 'Enter the API key from your account settings.',
            fields: [{ name: 'apiKey', label: 'API key', type: 'password', required: true }],
        },
        BASIC: {
            kind: 'form',
            hint: 'Username and password',
            path: '/api-auth/basic/',
            intro: 'Enter the username and password of your account.',
            fields: [
                { name: 'username', label: 'Username', type: 'text', required: true, autocomplete: 'username' },
                { name: 'password', label: 'Password', type: 'password', required: false, autocomplete: 'current-password' },
            ],
        },
        OAUTH2_CC: {
            kind: 'form',
            hint: 'Client ID and secret',
            path: '/oauth2/auth/',
            intro: 'Enter the client ID and client secret of your app.',
            fields: [
                { name: 'client_id', label: 'Client ID', type: 'text', required: true },
                { name: 'client_secret', label: 'Client secret', type: 'password', required: true },
            ],
        },
    };

    const state = {
        /** The session token. */
        token: null,
        /** Bumped with every new token: answers that arrive for an older one are dropped. */
        generation: 0,
        /** The embedding page's origin, once it has sent the token. */
        parentOrigin: null,
        session: null,
        /** The integrations the session may connect: {key, name, logo, mode}. */
        items: [],
        /** The OAuth flow under way. */
        attempt: null,
        tokenTimer: null,
    };

    const api = apiBase();
    const apiOrigin = api === null ? null : new URL(api).origin;

    /** The API's base URL without a trailing slash: `apiURL` if given, else this page's origin. */
    function apiBase() {
        const given = query.get('apiURL');
        if (given === null || given === '') {
            return window.location.origin;
        }
        try {
            const url = new URL(given);
            if (url.protocol === 'http:' || url.protocol === 'https:') {
                return url.href.replace(/\/+$/, '');
            }
        } catch (_) {
            // Not a URL: reported below.
        }
        return null;
    }

    // ---- Talking to the parent window ----

    function tell(message) {
        if (framed) {
            window.parent.postMessage(message, state.parentOrigin || '*');
        }
    }

    function close() {
        tell({ type: 'close' });
    }

    // ---- Rendering ----

    /** Puts a copy of the template `id` in the view; `fill` gets its `data-slot` elements. */
    function render(id, fill) {
        const fragment = document.getElementById(id).content.cloneNode(true);
        const slots = {};
        fragment.querySelectorAll('[data-slot]').forEach((element) => {
            slots[element.dataset.slot] = element;
        });
        if (fill) {
            fill(slots);
        }
        const view = document.getElementById('view');
        view.replaceChildren(fragment);
        const first = view.querySelector('input') || view.querySelector('h2');
        if (first) {
            first.focus();
        }
        return slots;
    }

    function message(title, text) {
        render('view-message', (slots) => {
            slots.title.textContent = title;
            slots.text.textContent = text;
        });
    }

    function invalidLink() {
        cancelAttempt();
        state.token = null;
        state.generation += 1;
        document.getElementById('for-user').hidden = true;
        message(
            'This link can no longer be used',
            'This link has expired or is not valid. Go back to the app that sent you here and ' +
                'start again to get a new one.',
        );
    }

    /** A failure to load the session (not a bad token). */
    function unavailable(answer) {
        render('view-failed', (slots) => {
            slots.title.textContent = 'The connection page could not load';
            slots.text.textContent = answer.message;
            slots.code.textContent = answer.code;
            slots.retry.addEventListener('click', () => begin(state.token));
            slots.back.hidden = true;
        });
    }

    function showUser(endUser) {
        const line = document.getElementById('for-user');
        const parts = endUser ? [endUser.display_name, endUser.email].filter((p) => typeof p === 'string' && p) : [];
        line.textContent = parts.length ? 'For ' + parts.join(' · ') : '';
        line.hidden = parts.length === 0;
    }

    /** The integration's logo, or its initial when it has none (or it does not load). */
    function logo(item) {
        const initial = document.createTextNode((item.name.trim()[0] || '?').toUpperCase());
        const shown = typeof item.logo === 'string'
            && (/^(https:|data:image\/)/.test(item.logo) || item.logo.startsWith(location.origin + '/'));
        if (!shown) {
            return initial;
        }
        const image = document.createElement('img');
        image.alt = '';
        image.referrerPolicy = 'no-referrer';
        image.src = item.logo;
        image.addEventListener('error', () => image.replaceWith(initial));
        return image;
    }

    /** Whether the page offers the list of integrations (a reconnect session has one only). */
    function hasList() {
        return state.items.length > 0 && !(state.session && state.session.isReconnecting);
    }

    function showList() {
        cancelAttempt();
        if (state.items.length === 0) {
            message(
                'Nothing to connect',
                'This link does not allow any service to be connected. Ask the app that sent you ' +
                    'here for a new link.',
            );
            return;
        }
        render('view-list', (slots) => {
            for (const item of state.items) {
                const entry = document.getElementById('integration-item').content.cloneNode(true);
                const button = entry.querySelector('button');
                entry.querySelector('[data-slot=name]').textContent = item.name;
                const mode = MODES[item.mode];
                entry.querySelector('[data-slot=hint]').textContent = mode ? mode.hint : 'Not available here';
                entry.querySelector('[data-slot=logo]').append(logo(item));
                button.dataset.integration = item.key;
                button.addEventListener('click', () => choose(item, true));
                slots.items.append(entry);
            }
        });
    }

    // ---- Loading a session ----

    async function begin(token) {
        window.clearTimeout(state.tokenTimer);
        if (!token) {
            invalidLink();
            return;
        }
        cancelAttempt();
        state.token = token;
        state.generation += 1;
        const generation = state.generation;
        const current = () => generation === state.generation;
        render('view-loading');

        const session = await call('GET', '/connect/session');
        if (!current()) {
            return;
        }
        if (!session.ok) {
            if (session.status === 401) {
                invalidLink();
            } else {
                unavailable(session);
            }
            return;
        }
        state.session = (session.body && session.body.data) || {};
        showUser(state.session.endUser);

        const listed = await call('GET', '/integrations');
        if (!current()) {
            return;
        }
        if (!listed.ok) {
            if (listed.status === 401) {
                invalidLink();
            } else {
                unavailable(listed);
            }
            return;
        }
        const integrations = Array.isArray(listed.body && listed.body.data) ? listed.body.data : [];
        const providers = new Map();
        const names = [...new Set(integrations.map((i) => i.provider).filter((p) => typeof p === 'string'))];
        await Promise.all(
            names.map(async (name) => {
                const answer = await call('GET', '/providers/' + encodeURIComponent(name));
                if (answer.ok && answer.body && answer.body.data) {
                    providers.set(name, answer.body.data);
                }
            }),
        );
        if (!current()) {
            return;
        }
        state.items = integrations
            .filter((i) => typeof i.unique_key === 'string')
            .map((i) => {
                const provider = providers.get(i.provider) || {};
                return {
                    key: i.unique_key,
                    name: String(provider.display_name || i.display_name || i.unique_key),
                    logo: i.logo || provider.logo_url || null,
                    mode: provider.auth_mode || null,
                };
            });
        if (state.session.isReconnecting && state.items.length === 1) {
            choose(state.items[0], false);
        } else {
            showList();
        }
    }

    /**
     * A call to the API: {ok, status, body} or {ok: false, status, code, message}, never a throw.
     * `bearer`: the token goes in the Authorization header (else the caller put it in the query).
     */
    async function call(method, path, { body, bearer = true } = {}) {
        const headers = { Accept: 'application/json' };
        if (bearer) {
            headers.Authorization = 'Bearer ' + state.token;
        }
        if (body !== undefined) {
            headers['Content-Type'] = 'application/json';
        }
        let response;
        try {
            response = await fetch(api + path, {
                method,
                headers,
                body: body === undefined ? undefined : JSON.stringify(body),
                credentials: 'omit',
                cache: 'no-store',
                referrerPolicy: 'no-referrer',
            });
        } catch (_) {
            return {
                ok: false,
                status: 0,
                code: 'network_error',
                message: 'The server could not be reached. Check your connection and try again.',
            };
        }
        let data = null;
        try {
            data = await response.json();
        } catch (_) {
            data = null;
        }
        if (response.ok) {
            return { ok: true, status: response.status, body: data };
        }
        const error = data && typeof data.error === 'object' && data.error !== null ? data.error : {};
        return {
            ok: false,
            status: response.status,
            code: typeof error.code === 'string' ? error.code : 'http_' + response.status,
            message:
                typeof error.message === 'string' && error.message
                    ? error.message
                    : 'The server answered with status ' + response.status + '.',
        };
    }

    // ---- Connecting ----

    /** `activated`: called from a click, so a popup may open now. */
    function choose(item, activated) {
        const mode = MODES[item.mode];
        if (!mode) {
            failed(item, 'unsupported_auth_mode', item.name + ' cannot be connected from this page.', false);
        } else if (mode.kind === 'form') {
            showForm(item, mode);
        } else if (activated) {
            startOAuth(item);
        } else {
            render('view-oauth', (slots) => {
                const again = state.session && state.session.isReconnecting;
                slots.title.textContent = (again ? 'Reconnect ' : 'Connect ') + item.name;
                slots.text.textContent = 'You sign in to ' + item.name + ' in a new window.';
                slots.open.textContent = 'Continue';
                slots.open.addEventListener('click', () => startOAuth(item));
                slots.back.hidden = !hasList();
                slots.back.addEventListener('click', showList);
            });
        }
    }

    function succeeded(item, connectionId) {
        tell({ type: 'connect', payload: { providerConfigKey: item.key, connectionId } });
        render('view-done', (slots) => {
            slots.title.textContent = item.name + ' is connected';
            slots.text.textContent = framed
                ? 'You can go back to the app now.'
                : 'You can close this window and go back to the app.';
            slots.finish.hidden = !framed;
            slots.finish.addEventListener('click', close);
            slots.another.hidden = !hasList() || state.items.length < 2;
            slots.another.addEventListener('click', showList);
        });
    }

    /** Shows a failure; `retry`: whether trying again can help. */
    function failed(item, code, text, retry) {
        tell({ type: 'error', payload: { errorType: code, errorMessage: text } });
        render('view-failed', (slots) => {
            slots.title.textContent = 'Could not connect ' + item.name;
            slots.text.textContent = text;
            slots.code.textContent = code;
            slots.retry.hidden = !retry;
            slots.retry.addEventListener('click', () => choose(item, true));
            slots.back.hidden = !hasList();
            slots.back.addEventListener('click', showList);
        });
    }

    function showForm(item, mode) {
        render('view-form', (slots) => {
            slots.title.textContent = 'Connect ' + item.name;
            slots.text.textContent = mode.intro;
            const inputs = {};
            mode.fields.forEach((field, index) => {
                const row = document.getElementById('form-field').content.cloneNode(true);
                const label = row.querySelector('label');
                const input = row.querySelector('input');
                input.id = 'field-' + index;
                input.name = field.name;
                input.type = field.type;
                input.required = field.required;
                input.autocomplete = field.autocomplete || 'off';
                label.htmlFor = input.id;
                label.textContent = field.label + (field.required ? '' : ' (optional)');
                inputs[field.name] = input;
                slots.fields.append(row);
            });
            slots.back.hidden = !hasList();
            slots.back.addEventListener('click', showList);
            slots.form.addEventListener('submit', async (event) => {
                event.preventDefault();
                const missing = mode.fields.find((f) => f.required && inputs[f.name].value === '');
                if (missing) {
                    showFormError(slots, 'Enter the ' + missing.label.toLowerCase() + '.');
                    inputs[missing.name].focus();
                    return;
                }
                const body = {};
                for (const field of mode.fields) {
                    body[field.name] = inputs[field.name].value;
                }
                const generation = state.generation;
                slots.submit.disabled = true;
                slots.submit.textContent = 'Connecting…';
                slots.error.hidden = true;
                const path =
                    mode.path + encodeURIComponent(item.key) + '?connect_session_token=' + encodeURIComponent(state.token);
                const answer = await call('POST', path, { body, bearer: false });
                if (generation !== state.generation) {
                    return;
                }
                if (answer.ok && answer.body && typeof answer.body.connectionId === 'string') {
                    succeeded(item, answer.body.connectionId);
                    return;
                }
                if (answer.status === 401) {
                    invalidLink();
                    return;
                }
                const failure = answer.ok
                    ? { code: 'unexpected_answer', message: 'The server answered without a connection.' }
                    : answer;
                tell({ type: 'error', payload: { errorType: failure.code, errorMessage: failure.message } });
                showFormError(slots, failure.message, failure.code);
                slots.submit.disabled = false;
                slots.submit.textContent = 'Connect';
            });
        });
    }

    function showFormError(slots, text, code) {
        slots.error.replaceChildren(document.createTextNode(text));
        if (code) {
            const line = document.createElement('span');
            const shown = document.createElement('code');
            line.className = 'error-code';
            shown.textContent = code;
            line.append(document.createTextNode('Error code: '), shown);
            slots.error.append(line);
        }
        slots.error.hidden = false;
    }

    // ---- OAuth in a popup ----

    function openPopup() {
        const width = 500;
        const height = 640;
        const left = Math.max(0, Math.round(window.screenX + (window.outerWidth - width) / 2));
        const top = Math.max(0, Math.round(window.screenY + (window.outerHeight - height) / 2));
        return window.open('', 'grantline-connect', `popup=yes,width=${width},height=${height},left=${left},top=${top}`);
    }

    function socketUrl() {
        const path = (state.session && state.session.websocketsPath) || '/';
        const url = new URL(path, api + '/');
        url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
        return url.href;
    }

    function startOAuth(item) {
        cancelAttempt();
        const popup = openPopup();
        if (!popup) {
            failed(
                item,
                'blocked_by_browser',
                'The browser blocked the sign-in window. Allow pop-ups for this page, then try again.',
                true,
            );
            return;
        }
        const attempt = { item, popup, socket: null, timers: [], done: false, navigated: false };
        state.attempt = attempt;
        render('view-oauth', (slots) => {
            slots.title.textContent = 'Sign in to ' + item.name;
            slots.text.textContent = 'Finish in the window that opened. This page updates when you are done.';
            slots.open.textContent = 'Reopen the window';
            slots.open.addEventListener('click', () => startOAuth(item));
            slots.back.textContent = 'Cancel';
            slots.back.addEventListener('click', () => (hasList() ? showList() : choose(item, false)));
        });

        const navigate = (wsClientId) => {
            if (attempt.navigated || attempt.done) {
                return;
            }
            attempt.navigated = true;
            let url =
                api + '/oauth/connect/' + encodeURIComponent(item.key) + '?connect_session_token=' + encodeURIComponent(state.token);
            if (wsClientId) {
                url += '&ws_client_id=' + encodeURIComponent(wsClientId);
            }
            try {
                popup.location.href = url;
            } catch (_) {
                settle(attempt, { ok: false, code: 'window_closed', message: 'The sign-in window was closed.' });
            }
        };

        try {
            const socket = new WebSocket(socketUrl());
            attempt.socket = socket;
            socket.addEventListener('message', (event) => {
                let data;
                try {
                    data = JSON.parse(event.data);
                } catch (_) {
                    return;
                }
                if (data.message_type === 'connection_ack' && typeof data.ws_client_id === 'string') {
                    navigate(data.ws_client_id);
                } else if (data.message_type === 'success' && typeof data.connection_id === 'string') {
                    settle(attempt, { ok: true, connectionId: data.connection_id });
                } else if (data.message_type === 'error') {
                    settle(attempt, { ok: false, code: String(data.error_type || 'unknown_error'), message: String(data.error_desc || 'The sign-in failed.') });
                }
            });
            // Without the socket the callback page's message still tells the outcome.
            socket.addEventListener('close', () => navigate(null));
        } catch (_) {
            navigate(null);
        }
        attempt.timers.push(window.setTimeout(() => navigate(null), SOCKET_WAIT_MS));
        if (detectClosedWindow) {
            const poll = window.setInterval(() => {
                if (popup.closed) {
                    window.clearInterval(poll);
                    // The outcome may still be on its way.
                    attempt.timers.push(
                        window.setTimeout(
                            () =>
                                settle(attempt, {
                                    ok: false,
                                    code: 'window_closed',
                                    message: 'The sign-in window was closed before the connection was made.',
                                }),
                            1500,
                        ),
                    );
                }
            }, 500);
            attempt.timers.push(poll);
        }
    }

    /** The outcome of the flow `attempt`, the first one only. */
    function settle(attempt, outcome) {
        if (attempt.done) {
            return;
        }
        stop(attempt);
        if (outcome.ok) {
            succeeded(attempt.item, outcome.connectionId);
        } else {
            failed(attempt.item, outcome.code, outcome.message, true);
        }
    }

    function stop(attempt) {
        attempt.done = true;
        attempt.timers.forEach((timer) => {
            window.clearTimeout(timer);
            window.clearInterval(timer);
        });
        if (attempt.socket) {
            attempt.socket.close();
        }
        try {
            if (!attempt.popup.closed) {
                attempt.popup.close();
            }
        } catch (_) {
            // Gone already.
        }
        if (state.attempt === attempt) {
            state.attempt = null;
        }
    }

    function cancelAttempt() {
        if (state.attempt) {
            stop(state.attempt);
        }
    }

    // ---- Messages and start ----

    function onMessage(event) {
        const data = event.data;
        if (framed && event.source === window.parent) {
            if (data && data.type === 'session_token' && typeof data.sessionToken === 'string') {
                if (event.origin && event.origin !== 'null') {
                    state.parentOrigin = event.origin;
                }
                if (data.sessionToken !== state.token) {
                    begin(data.sessionToken);
                }
            }
            return;
        }
        // The callback page of this server, in the popup this page opened.
        const attempt = state.attempt;
        if (!attempt || event.source !== attempt.popup || event.origin !== apiOrigin || !data) {
            return;
        }
        if (data.eventType === 'AUTHORIZATION_SUCEEDED' && data.data && typeof data.data.connectionId === 'string') {
            settle(attempt, { ok: true, connectionId: data.data.connectionId });
        } else if (data.eventType === 'AUTHORIZATION_FAILED') {
            const error = (data.data && data.data.error) || {};
            settle(attempt, {
                ok: false,
                code: String(error.type || 'unknown_error'),
                message: String(error.message || 'The sign-in failed.'),
            });
        }
    }

    function start() {
        if (framed) {
            document.body.classList.add('framed');
            const button = document.getElementById('close');
            button.hidden = false;
            button.addEventListener('click', close);
            document.addEventListener('keydown', (event) => {
                if (event.key === 'Escape') {
                    close();
                }
            });
        }
        window.addEventListener('message', onMessage);
        const fromAddress = query.get('session_token');
        if (fromAddress !== null) {
            query.delete('session_token');
            const rest = query.toString();
            window.history.replaceState(null, '', window.location.pathname + (rest ? '?' + rest : '') + window.location.hash);
        }
        if (api === null) {
            message('This page is set up wrongly', 'Its apiURL parameter is not an http(s) address.');
            tell({ type: 'error', payload: { errorType: 'invalid_host_url', errorMessage: 'apiURL is not an http(s) URL' } });
            return;
        }
        tell({ type: 'ready' });
        if (fromAddress !== null) {
            begin(fromAddress);
        } else if (framed) {
            state.tokenTimer = window.setTimeout(() => {
                if (state.token === null) {
                    invalidLink();
                }
            }, TOKEN_WAIT_MS);
        } else {
            invalidLink();
        }
    }

    start();
})();
