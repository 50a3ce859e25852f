// Drives the dashboard (/ui/) in headless Chromium, as an operator would: signs in, finds a
// connection by tag, opens its history, refreshes it and sees the new events, starts a rebuild
// and watches it finish, looks at integrations and operations, signs out. Saves a screenshot of
// every page under $SCREENSHOTS. Run by tests/api/dashboard.rs.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';

const base = process.env.GRANTLINE_URL;
const secret = process.env.GRANTLINE_SECRET;
const shots = process.env.SCREENSHOTS;
const wanted = process.env.CONNECTION_ID;
const tag = process.env.TAG;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ['--no-sandbox'],
});
const problems = [];
const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
try {
  // Any script error or CSP violation is a failure.
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().includes('401')) problems.push(`console: ${m.text()}`);
  });
  const shot = async (name) => {
    await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
    console.log(`screenshot ${name}.png`);
  };
  const step = (name) => console.log(`step: ${name}`);

  step('signing in');
  await page.goto(`${base}/ui/`);
  assert.match(page.url(), /\/ui\/login\?next=/);
  await shot('01-sign-in');
  await page.fill('#secret_key', 'not the key');
  await page.press('#secret_key', 'Enter');
  await page.waitForSelector('p.error');
  assert.match(await page.textContent('p.error'), /not the secret key/);
  await page.fill('#secret_key', secret);
  await page.press('#secret_key', 'Enter');
  await page.waitForURL(`${base}/ui/`);
  assert.equal(await page.textContent('h1'), 'Overview');
  await shot('02-overview');

  step('finding a connection by tag');
  await page.click('nav a:text("Connections")');
  await page.waitForURL(`${base}/ui/connections`);
  await page.fill('#tag', tag);
  await page.click('form.filters button[type=submit]');
  await page.waitForURL(/tag=/);
  const rows = await page.$$eval('tbody tr td:first-child a', (links) => links.map((a) => a.textContent));
  assert.deepEqual(rows, [wanted], `the tag ${tag} picks ${wanted} only`);
  await shot('03-connections-by-tag');

  step('opening its history');
  await page.click(`tbody a:text("${wanted}")`);
  await page.waitForSelector('ol.timeline');
  const before = await page.$$eval('ol.timeline > li', (items) => items.length);
  assert.equal(before, 1, 'an imported connection has one event');
  assert.match(await page.textContent('ol.timeline'), /connection_authorized/);
  await shot('04-connection');

  step('refreshing it now');
  await page.click('button:text("Refresh now")');
  await page.waitForFunction((n) => document.querySelectorAll('ol.timeline > li').length > n, before);
  const timeline = await page.textContent('ol.timeline');
  assert.match(timeline, /tokens_refreshed/);
  assert.match(timeline, /trigger force/);
  assert.match(await page.textContent('#lineage + table'), /2/);
  await shot('05-connection-refreshed');

  step('rebuilding the connections projection');
  await page.click('nav a:text("Operations")');
  await page.waitForSelector('#projections');
  await shot('06-operations');
  await page.click('button[aria-label="Rebuild connections"]');
  // The page reloads itself while the rebuild runs; it ends with "rebuilt N events".
  await page.waitForSelector('text=/rebuilt \\d+ events/', { timeout: 20000 });
  await shot('07-rebuilt');

  step('integrations');
  await page.click('nav a:text("Integrations")');
  await page.waitForSelector('table');
  await shot('08-integrations');
  await page.click('tbody a:text("fake")');
  await page.waitForSelector('#client_secret');
  assert.equal(await page.inputValue('#client_secret'), '', 'the client secret is never shown');
  await shot('09-integration');

  step('keyboard: the skip link comes first');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');

  step('signing out');
  await page.click('button:text("Sign out")');
  await page.waitForURL(/\/ui\/login/);
  await page.goto(`${base}/ui/connections`);
  assert.match(page.url(), /\/ui\/login/);
  await shot('10-signed-out');

  step('without JavaScript, read-only pages still work');
  const plain = await browser.newContext({ javaScriptEnabled: false });
  const noJs = await plain.newPage();
  await noJs.goto(`${base}/ui/login`);
  await noJs.fill('#secret_key', secret);
  await noJs.click('button[type=submit]');
  await noJs.waitForURL(`${base}/ui/`);
  await noJs.goto(`${base}/ui/connections?tag=${encodeURIComponent(tag)}`);
  assert.match(await noJs.textContent('tbody'), new RegExp(wanted));
  await plain.close();

  assert.deepEqual(problems, []);
  console.log('all steps passed');
} catch (error) {
  // What the page showed when it failed, to look at.
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.log(`failed on ${page.url()}:\n${await page.textContent('main').catch(() => '')}`);
  throw error;
} finally {
  await browser.close();
}
