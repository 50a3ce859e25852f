// Drives Grantline's hosted Connect UI (/connect/) in headless Chromium through playwright-core,
// as an end user would: through a session's connect_link (an OAuth popup, an API-key form used
// with the keyboard), framed by another site's page through @nangohq/frontend's openConnectUI,
// through a reconnect session, and with links that cannot work (expired, deleted, unknown
// tokens; an integration the session does not allow). Also @nangohq/frontend alone on another
// site's page, as an app that draws its own UI uses it. Each step prints one line and saves a screenshot
// of the page; the first failure exits non-zero. Tokens are never printed.
//
// Started by tests/api/connect_ui.rs, which provides:
//   GRANTLINE_URL        the server, e.g. http://127.0.0.1:4000
//   GRANTLINE_SECRET     its secret key
//   CHROMIUM             the Chromium binary
//   SCREENSHOTS_DIR      where the screenshots go
//   EXPIRED_TOKEN        the token of a session that has expired
//   OAUTH_INTEGRATION    an OAuth 2 integration on the fake provider (its /authorize says yes)
//   API_KEY_INTEGRATION  an API-key integration on the fake provider
//   FAKE_API_KEY         the key the fake provider accepts

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const env = (name) => {
    const value = process.env[name];
    if (!value) {
        throw new Error(`${name} is not set (run by tests/api/connect_ui.rs)`);
    }
    return value;
};

const BASE = env('GRANTLINE_URL').replace(/\/$/, '');
const SECRET = env('GRANTLINE_SECRET');
const SHOTS = env('SCREENSHOTS_DIR');
const EXPIRED = env('EXPIRED_TOKEN');
const OAUTH = env('OAUTH_INTEGRATION');
const API_KEY = env('API_KEY_INTEGRATION');
const FAKE_API_KEY = env('FAKE_API_KEY');
const FRONTEND = path.join(path.dirname(fileURLToPath(import.meta.url)), 'node_modules/@nangohq/frontend/dist');
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const INVALID_LINK = 'This link has expired or is not valid';
/** Generous for a page on loopback, short enough that a stuck step fails fast. */
const WAIT = { timeout: 10000 };

/** Every token handed to a page: none may show up in a console message. */
const tokens = [EXPIRED];
/** What went wrong in a page (script errors, refused resources) or leaked to its console. */
const problems = [];
let shots = 0;
/** The browser context, once there is one. */
let context = null;

async function step(name, run) {
    try {
        const detail = await run();
        console.log(`ok   ${name}${detail ? `: ${detail}` : ''}`);
    } catch (error) {
        console.log(`FAIL ${name}`);
        for (const problem of problems) {
            console.log(`     ${problem}`);
        }
        // What each open page showed when the step failed.
        for (const open of context ? context.pages() : []) {
            await shot(open, 'failure').catch(() => {});
            const text = await open.locator('body').innerText().catch(() => '');
            console.log(`     ${open.url().split('?')[0]}: ${text.replace(/\s+/g, ' ').slice(0, 300)}`);
            for (const frame of open.frames().slice(1)) {
                const inner = await frame.locator('body').innerText().catch(() => '');
                console.log(`     frame ${frame.url().split('?')[0]}: ${inner.replace(/\s+/g, ' ').slice(0, 300)}`);
            }
        }
        throw error;
    }
}

/** Saves a screenshot of `page` as `NN-name.png`. */
async function shot(page, name) {
    shots += 1;
    const file = path.join(SHOTS, `${String(shots).padStart(2, '0')}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
}

/** A call to the API with the secret key: {status, body}. */
async function api(method, route, body) {
    const response = await fetch(BASE + route, {
        method,
        headers: {
            authorization: `Bearer ${SECRET}`,
            ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** A new connect session: {token, link}. */
async function newSession(body, route = '/connect/sessions') {
    const answer = await api('POST', route, body);
    assert.equal(answer.status, 201, JSON.stringify(answer.body));
    const { token, connect_link: link } = answer.body.data;
    assert.equal(link, `${BASE}/connect/?session_token=${token}`);
    tokens.push(token);
    return { token, link };
}

/** The connections of the end user `id` on `integration`. */
async function connectionsOf(id, integration) {
    const answer = await api('GET', `/connections?endUserId=${id}&integrationId=${integration}`);
    assert.equal(answer.status, 200, JSON.stringify(answer.body));
    return answer.body.connections;
}

/** Watches a page (and the popups it opens) for script errors, CSP refusals and leaked tokens. */
function watch(page) {
    page.on('pageerror', (error) => problems.push(`script error on ${page.url()}: ${error.message}`));
    page.on('console', (message) => {
        const text = message.text();
        if (tokens.some((token) => text.includes(token))) {
            problems.push(`a session token was written to the console of ${page.url()}`);
        }
        // Answers such as a 401 are logged by the browser itself; they are expected here.
        if (message.type() === 'error' && !text.startsWith('Failed to load resource')) {
            problems.push(`console error on ${page.url()}: ${text}`);
        }
    });
}

/** Asserts what the page keeps holds none of the session's token. */
async function assertTokenNowhere(page, token) {
    assert.ok(!page.url().includes(token), 'the token is still in the address bar');
    assert.ok(!page.url().includes('session_token'), page.url().replace(token, '<token>'));
    const html = await page.content();
    assert.ok(!html.includes(token), 'the token is in the page');
    const stored = await page.evaluate(() => localStorage.length + sessionStorage.length + document.cookie.length);
    assert.equal(stored, 0, 'something was stored');
}

/** Resolves when `page` has closed, including when it closed before this was called. */
function closed(page) {
    return new Promise((resolve, reject) => {
        if (page.isClosed()) {
            resolve();
            return;
        }
        const timer = setTimeout(() => reject(new Error(`${page.url()} did not close`)), WAIT.timeout);
        page.once('close', () => {
            clearTimeout(timer);
            resolve();
        });
    });
}

/**
 * Clicks `target` (in `page` or a frame of it) and waits for the popup it opens to run its flow
 * and close; the addresses the popup went through, without their queries.
 */
async function throughPopup(context, target) {
    const visited = [];
    const record = (request) => {
        if (request.isNavigationRequest()) {
            visited.push(new URL(request.url()));
        }
    };
    context.on('request', record);
    try {
        const [popup] = await Promise.all([context.waitForEvent('page', WAIT), target.click()]);
        // The fake provider says yes at once; the callback page closes itself, possibly before
        // `click()` above has returned, so a 'close' event may already be past.
        await closed(popup);
        const start = visited.find((url) => url.pathname.startsWith('/oauth/connect/'));
        assert.ok(start, 'the popup did not start a flow');
        // The flow names the page's WebSocket, over which the page learns the outcome.
        assert.match(start.searchParams.get('ws_client_id') ?? '', UUID_V4, 'no ws_client_id');
        return visited.map((url) => url.origin + url.pathname);
    } finally {
        context.off('request', record);
    }
}

// The embedding app of step (c), on an origin of its own: its page, and Nango's frontend as the
// app would bundle it. (Served from loopback: Chromium refuses to let a page of a public address
// frame one on loopback, which is what Grantline is here.)
let hostPage = '';
const appServer = http.createServer(async (request, response) => {
    const { pathname } = new URL(request.url, 'http://app');
    if (pathname === '/') {
        response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        response.end(hostPage);
    } else if (/^\/nango\/[a-zA-Z]+\.js$/.test(pathname)) {
        const body = await readFile(path.join(FRONTEND, path.basename(pathname)), 'utf8').catch(() => null);
        response.writeHead(body === null ? 404 : 200, { 'content-type': 'text/javascript; charset=utf-8' });
        response.end(body ?? '');
    } else {
        response.writeHead(404, { 'content-type': 'text/plain' });
        response.end('not found');
    }
});
await new Promise((resolve) => appServer.listen(0, '127.0.0.1', resolve));
const APP = `http://127.0.0.1:${appServer.address().port}`;
assert.notEqual(new URL(APP).origin, new URL(BASE).origin);

const browser = await chromium.launch({
    executablePath: env('CHROMIUM'),
    headless: true,
    args: ['--no-sandbox'],
});
try {
    context = await browser.newContext({ viewport: { width: 900, height: 720 } });
    context.setDefaultTimeout(WAIT.timeout);
    context.on('page', watch);
    const page = await context.newPage();
    let oauthConnection;

    const ada = { id: 'ada', email: 'ada@example.com', display_name: 'Ada Lovelace' };
    const main = await newSession({
        end_user: ada,
        tags: { team: 'core' },
        allowed_integrations: [OAUTH, API_KEY],
    });

    await step('(a) the connect_link lists the allowed integrations', async () => {
        await page.goto(main.link);
        await page.locator(`button[data-integration="${OAUTH}"]`).waitFor();
        await page.locator(`button[data-integration="${API_KEY}"]`).waitFor();
        assert.equal(await page.locator('button[data-integration]').count(), 2);
        assert.equal(await page.locator('#for-user').textContent(), 'For Ada Lovelace · ada@example.com');
        await assertTokenNowhere(page, main.token);
        await shot(page, 'list');
        return 'token gone from the address bar, the page and storage';
    });

    await step('(a) the OAuth integration connects through the popup', async () => {
        const visited = await throughPopup(context, page.locator(`button[data-integration="${OAUTH}"]`));
        assert.ok(visited.includes(`${BASE}/oauth/connect/${OAUTH}`), visited.join(' '));
        assert.ok(visited.includes(`${BASE}/oauth/callback`), visited.join(' '));
        await page.getByRole('heading', { name: 'fake is connected' }).waitFor();
        await shot(page, 'oauth-connected');
        const [connection, ...more] = await connectionsOf(ada.id, OAUTH);
        assert.equal(more.length, 0, 'one connection');
        assert.match(connection.connection_id, UUID_V4);
        assert.equal(connection.provider_config_key, OAUTH);
        assert.deepEqual(connection.end_user, { ...connection.end_user, ...ada });
        assert.equal(connection.tags.team, 'core');
        assert.equal(connection.tags.end_user_id, ada.id);
        assert.equal(connection.tags.end_user_email, ada.email);
        oauthConnection = connection.connection_id;
        return 'the connection has the session’s tags and end user';
    });

    await step('(b) the API-key integration connects through its form, by keyboard', async () => {
        await page.getByRole('button', { name: 'Connect another account' }).click();
        await page.locator('button[data-integration]').first().waitFor();
        // From the list's heading, Tab to the API-key integration and choose it with Enter.
        for (let i = 0; i < 5; i += 1) {
            await page.keyboard.press('Tab');
            if (await page.evaluate(() => document.activeElement.dataset.integration) === API_KEY) {
                break;
            }
        }
        await page.keyboard.press('Enter');
        const field = page.getByLabel('API key');
        await field.waitFor();
        assert.equal(await field.evaluate((input) => input === document.activeElement), true, 'focus on the key');
        assert.equal(await field.getAttribute('type'), 'password');
        await shot(page, 'api-key-form');

        // A key the provider refuses: the API's code and message are shown, the form stays.
        await page.keyboard.type('not-the-key');
        await page.keyboard.press('Enter');
        const error = page.locator('p.error');
        await error.waitFor();
        const shown = await error.textContent();
        assert.match(shown, /connection_test_failed/);
        await shot(page, 'api-key-refused');

        await field.fill(FAKE_API_KEY);
        await page.keyboard.press('Enter');
        await page.getByRole('heading', { name: 'fake-key is connected' }).waitFor();
        await shot(page, 'api-key-connected');
        const connections = await connectionsOf(ada.id, API_KEY);
        assert.equal(connections.length, 1);
        assert.equal(connections[0].tags.team, 'core');
        return `refused first (${shown.trim()}), then connected`;
    });

    await step('a sign-in window closed before the end is reported when asked to', async () => {
        // The provider never answers here: the user gives up and closes the window.
        await context.route(`${BASE}/oauth/connect/**`, (route) =>
            route.fulfill({ contentType: 'text/html', body: '<!doctype html><title>Sign in</title><p>Waiting…</p>' }),
        );
        try {
            await page.goto(`${main.link}&detectClosedAuthWindow=true`);
            const [popup] = await Promise.all([
                context.waitForEvent('page'),
                page.locator(`button[data-integration="${OAUTH}"]`).click(),
            ]);
            await page.getByRole('heading', { name: 'Sign in to fake' }).waitFor();
            await shot(page, 'oauth-waiting');
            await popup.waitForURL(`${BASE}/oauth/connect/**`);
            await popup.close();
            await page.getByRole('heading', { name: 'Could not connect fake' }).waitFor();
            assert.equal(await page.locator('[data-slot=code]').textContent(), 'window_closed');
            await shot(page, 'oauth-window-closed');
        } finally {
            await context.unroute(`${BASE}/oauth/connect/**`);
        }
        assert.equal((await connectionsOf(ada.id, OAUTH)).length, 1, 'no second connection');
        return 'window_closed, with a way to try again';
    });

    await step('(c) openConnectUI on another site frames the page and hears `connect`', async () => {
        const grace = await newSession({ end_user: { id: 'grace' }, allowed_integrations: [OAUTH] });
        hostPage = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Example app</title></head>
<body style="font-family: sans-serif; padding: 2rem">
<h1>Example app</h1>
<p>The app's own page, with Nango's frontend.</p>
<button id="connect">Connect an account</button>
<script type="module">
import Nango from '/nango/index.js';
window.events = [];
document.getElementById('connect').addEventListener('click', () => {
    const nango = new Nango({ host: ${JSON.stringify(BASE)}, connectSessionToken: ${JSON.stringify(grace.token)} });
    nango.openConnectUI({
        baseURL: ${JSON.stringify(`${BASE}/connect`)},
        apiURL: ${JSON.stringify(BASE)},
        onEvent: (event) => window.events.push(event),
    });
});
</script>
</body></html>`;
        const app = await context.newPage();
        await app.goto(`${APP}/`);
        await app.locator('#connect').click();
        const frame = app.frameLocator('#connect-ui');
        const choice = frame.locator(`button[data-integration="${OAUTH}"]`);
        await choice.waitFor();
        assert.equal(await frame.locator('button[data-integration]').count(), 1);
        await shot(app, 'framed-list');

        await throughPopup(context, choice);
        await frame.getByRole('heading', { name: 'fake is connected' }).waitFor();
        await app.waitForFunction(() => window.events.some((e) => e.type === 'connect'));
        await shot(app, 'framed-connected');
        const events = await app.evaluate(() => window.events);
        assert.equal(events[0].type, 'ready');
        const connect = events.find((e) => e.type === 'connect');
        assert.equal(connect.payload.providerConfigKey, OAUTH);
        assert.match(connect.payload.connectionId, UUID_V4);
        const read = await api('GET', `/connections/${connect.payload.connectionId}?provider_config_key=${OAUTH}`);
        assert.equal(read.status, 200, JSON.stringify(read.body));
        assert.equal(read.body.end_user.id, 'grace');
        assert.ok(!JSON.stringify(events).includes(grace.token), 'an event carries the token');

        // Done closes the UI: the parent hears `close` and removes the frame.
        await frame.getByRole('button', { name: 'Done' }).click();
        await app.waitForFunction(() => window.events.some((e) => e.type === 'close'));
        await app.locator('#connect-ui').waitFor({ state: 'detached' });
        await app.close();
        return `events ${events.map((e) => e.type).join(', ')}, then close`;
    });

    await step('(e) the frontend on another site connects an API key and an OAuth account itself', async () => {
        // No Connect UI: the app's page calls Grantline across origins (CORS preflights for the
        // JSON post) and listens on its WebSocket for the popup's outcome.
        const lin = await newSession({ end_user: { id: 'lin' }, allowed_integrations: [OAUTH, API_KEY] });
        hostPage = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Example app</title></head>
<body style="font-family: sans-serif; padding: 2rem">
<h1>Example app</h1>
<button id="key">Connect with a key</button>
<button id="oauth">Connect with OAuth</button>
<script type="module">
import Nango from '/nango/index.js';
const nango = new Nango({ host: ${JSON.stringify(BASE)}, connectSessionToken: ${JSON.stringify(lin.token)} });
window.outcomes = [];
const connect = (button, run) => document.getElementById(button).addEventListener('click', () => {
    run().then(
        (result) => window.outcomes.push({ button, result }),
        (error) => window.outcomes.push({ button, error: String(error.type ?? error.message) }),
    );
});
connect('key', () => nango.auth(${JSON.stringify(API_KEY)}, { credentials: { apiKey: ${JSON.stringify(FAKE_API_KEY)} } }));
connect('oauth', () => nango.auth(${JSON.stringify(OAUTH)}));
</script>
</body></html>`;
        const app = await context.newPage();
        await app.goto(`${APP}/`);

        await app.locator('#key').click();
        await app.waitForFunction(() => window.outcomes.length === 1);
        const [key] = await app.evaluate(() => window.outcomes);
        assert.equal(key.error, undefined, `auth() with a key failed: ${key.error}`);
        assert.equal(key.result.providerConfigKey, API_KEY);
        assert.match(key.result.connectionId, UUID_V4);

        await throughPopup(context, app.locator('#oauth'));
        await app.waitForFunction(() => window.outcomes.length === 2);
        const [, oauth] = await app.evaluate(() => window.outcomes);
        assert.equal(oauth.error, undefined, `auth() through the popup failed: ${oauth.error}`);
        assert.equal(oauth.result.providerConfigKey, OAUTH);
        await shot(app, 'frontend-connected');
        await app.close();

        assert.deepEqual((await connectionsOf('lin', API_KEY)).map((c) => c.connection_id), [key.result.connectionId]);
        assert.deepEqual((await connectionsOf('lin', OAUTH)).map((c) => c.connection_id), [oauth.result.connectionId]);
        return `from ${APP}, both connected`;
    });

    await step('a reconnect session goes straight to its integration', async () => {
        const again = await newSession(
            { connection_id: oauthConnection, integration_id: OAUTH, end_user: ada, tags: { team: 'core' } },
            '/connect/sessions/reconnect',
        );
        await page.goto(again.link);
        await page.getByRole('heading', { name: 'Reconnect fake' }).waitFor();
        assert.equal(await page.locator('button[data-integration]').count(), 0, 'no list');
        await shot(page, 'reconnect');
        await throughPopup(context, page.getByRole('button', { name: 'Continue' }));
        await page.getByRole('heading', { name: 'fake is connected' }).waitFor();
        const connections = await connectionsOf(ada.id, OAUTH);
        assert.deepEqual(
            connections.map((c) => c.connection_id),
            [oauthConnection],
        );
        return 'the same connection, re-authorized';
    });

    await step('the callback page broadcasts its outcome, as today’s Nango Connect UI expects', async () => {
        // A page of Grantline's origin listening, as Nango's Connect UI does; the outcome of a
        // callback whose state is unknown (a success page closes before it could be watched:
        // the WebSocket settles the flow first).
        await page.goto(`${BASE}/connect/`);
        await page.evaluate(() => {
            window.broadcasts = [];
            window.channel = new BroadcastChannel('nango-oauth-callback');
            window.channel.onmessage = (event) => window.broadcasts.push(event.data);
        });
        const callback = await context.newPage();
        await callback.goto(`${BASE}/oauth/callback?state=unknown&code=x`);
        await page.waitForFunction(() => window.broadcasts.length > 0);
        const [broadcast, ...more] = await page.evaluate(() => window.broadcasts);
        await callback.close();
        assert.equal(more.length, 0);
        assert.equal(broadcast.type, 'nango_oauth_callback_error');
        assert.equal(broadcast.payload.errorType, 'state_err');
        return `${broadcast.type} (${broadcast.payload.errorType})`;
    });

    await step('(d) expired, deleted, unknown and missing tokens show the clear message', async () => {
        const deleted = await newSession({ end_user: { id: 'gone' } });
        const answer = await fetch(`${BASE}/connect/session`, {
            method: 'DELETE',
            headers: { authorization: `Bearer ${deleted.token}` },
        });
        assert.equal(answer.status, 204);
        const unknown = `nango_connect_session_${randomBytes(32).toString('hex')}`;
        tokens.push(unknown);
        const cases = [
            ['expired', `${BASE}/connect/?session_token=${EXPIRED}`],
            ['deleted', deleted.link],
            ['unknown', `${BASE}/connect/?session_token=${unknown}`],
            ['malformed', `${BASE}/connect/?session_token=not-a-token`],
            ['missing', `${BASE}/connect/`],
            ['without-slash', `${BASE}/connect?session_token=${unknown}`],
        ];
        for (const [name, link] of cases) {
            await page.goto(link);
            await page.getByText(INVALID_LINK).waitFor();
            assert.equal(await page.locator('button[data-integration]').count(), 0, name);
            assert.ok(!page.url().includes('session_token'), `${name}: token left in the address`);
            if (name === 'expired') {
                await shot(page, 'expired');
            }
        }
        return cases.map(([name]) => name).join(', ');
    });

    await step('(d) an integration the session does not allow is refused by the API, and shown', async () => {
        const narrow = await newSession({ end_user: { id: 'eve' }, allowed_integrations: [OAUTH] });
        // A listing that offers the API-key integration anyway (as a stale or tampered page
        // would): the API still refuses it.
        await page.route(`${BASE}/integrations`, async (route) => {
            const response = await route.fetch();
            const json = await response.json();
            assert.equal(json.data.length, 1, 'the API lists only the allowed integration');
            json.data.push({ unique_key: API_KEY, provider: 'fake-key', display_name: 'fake-key', logo: null });
            await route.fulfill({ response, json });
        });
        await page.goto(narrow.link);
        await page.locator(`button[data-integration="${API_KEY}"]`).click();
        await page.getByLabel('API key').fill(FAKE_API_KEY);
        await page.getByRole('button', { name: 'Connect', exact: true }).click();
        const error = page.locator('p.error');
        await error.waitFor();
        const shown = await error.textContent();
        assert.match(shown, /integration_not_allowed/);
        await shot(page, 'not-allowed');
        await page.unroute(`${BASE}/integrations`);
        assert.equal((await connectionsOf('eve', API_KEY)).length, 0);
        return shown.trim();
    });

    assert.deepEqual(problems, [], 'problems in the pages');
    console.log(`screenshots: ${shots} in ${SHOTS}`);
    console.log('all steps passed');
} finally {
    await browser.close();
    appServer.close();
}
