// End to end in a real browser: Debian's Chromium driven by playwright-core opens the demo page
// the engine serves, in two browser contexts (two people). Screenshots are kept in
// $SYNCHRONY_ARTIFACTS_DIR (default target/test-artifacts/demo-e2e).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { existsSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { chromium } from 'playwright-core'
import { startEngine, mintToken } from './engine.mjs'

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
const ARTIFACTS = process.env.SYNCHRONY_ARTIFACTS_DIR ||
  new URL('../../target/test-artifacts/demo-e2e', import.meta.url).pathname
const WAIT = 30000

// CI installs Chromium (tests/run.sh); a developer without it is told, not failed.
const missing = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`
if (missing && process.env.CI) throw new Error(missing)

let browser
before(async () => {
  if (missing) return
  mkdirSync(ARTIFACTS, { recursive: true })
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking', '--no-first-run']
  })
})
after(async () => { await browser?.close() })

async function openPage (url, who) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } })
  const page = await context.newPage()
  const errors = []
  page.on('pageerror', (error) => errors.push(error.message))
  await page.goto(url)
  page.errors = errors
  page.who = who
  return page
}

// What the editor shows (its own document; the DOM also holds the cursor labels).
const editorText = (page) => page.evaluate(() => window.synchronyDemo.view.state.doc.toString())

async function expectText (page, fragment) {
  await page.waitForFunction((f) => window.synchronyDemo.view.state.doc.toString().includes(f), fragment, { timeout: WAIT })
}

async function typeAtEnd (page, text) {
  await page.locator('.cm-content').click()
  await page.keyboard.press('Control+End')
  await page.keyboard.type(text)
}

async function expectStatus (page, status) {
  await page.locator(`#status[data-status="${status}"]`).waitFor({ timeout: WAIT })
}

async function expectSaved (page, saved) {
  await page.locator(`#saved[data-saved="${saved}"]`).waitFor({ timeout: WAIT })
}

async function shoot (page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true })
}

test('two people edit together, see each other, and survive an engine restart', { skip: missing }, async () => {
  let engine = await startEngine()
  const { port, dataDir } = engine
  const doc = `e2e-${Date.now()}`
  const demo = `${engine.http}/demo/?doc=${doc}`
  const alice = await openPage(`${demo}&name=Alice`, 'alice')
  const bob = await openPage(`${demo}&name=Bob`, 'bob')
  try {
    await expectStatus(alice, 'connected')
    await expectStatus(bob, 'connected')

    await typeAtEnd(alice, 'Hello from Alice.')
    await expectText(bob, 'Hello from Alice.')
    // Bob sees Alice's cursor with her name and both people in the list.
    await bob.locator('.cm-ySelectionInfo', { hasText: 'Alice' }).waitFor({ timeout: WAIT })
    await bob.locator('#people .person', { hasText: 'Alice' }).waitFor({ timeout: WAIT })
    assert.equal(await bob.locator('#people .person', { hasText: 'Bob (you)' }).count(), 1)

    await typeAtEnd(bob, ' And Bob.')
    await expectText(alice, 'And Bob.')
    await alice.locator('.cm-ySelectionInfo', { hasText: 'Bob' }).waitFor({ timeout: WAIT })
    await expectSaved(alice, 'saved')
    await expectSaved(bob, 'saved')
    await shoot(alice, '1-alice-editing')
    await shoot(bob, '1-bob-editing')

    // The engine dies mid-session: both pages notice and keep editing offline.
    await engine.kill('SIGKILL')
    await expectStatus(alice, 'disconnected')
    await expectStatus(bob, 'disconnected')
    await typeAtEnd(alice, '\nAlice, offline.')
    await typeAtEnd(bob, '\nBob, offline.')
    await expectSaved(alice, 'unsaved')
    await expectSaved(bob, 'unsaved')
    await shoot(alice, '2-alice-offline')

    // Back on the same port and data: both reconnect, converge, and everything is saved.
    engine = await startEngine({ port, dataDir })
    await expectStatus(alice, 'connected')
    await expectStatus(bob, 'connected')
    await expectSaved(alice, 'saved')
    await expectSaved(bob, 'saved')
    const converged = async () => {
      const [a, b] = [await editorText(alice), await editorText(bob)]
      return a === b && a.includes('Alice, offline.') && a.includes('Bob, offline.') ? a : null
    }
    let text = null
    for (const start = Date.now(); !(text = await converged());) {
      if (Date.now() - start > WAIT) {
        assert.fail(`pages did not converge:\nalice: ${await editorText(alice)}\nbob: ${await editorText(bob)}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    for (const line of ['Hello from Alice. And Bob.', 'Alice, offline.', 'Bob, offline.']) assert.ok(text.includes(line), `${line} in ${text}`)
    await bob.locator('.cm-ySelectionInfo', { hasText: 'Alice' }).waitFor({ timeout: WAIT })
    await shoot(alice, '3-alice-reconnected')
    await shoot(bob, '3-bob-reconnected')

    // What the pages show is what the engine stored.
    const stored = await fetch(`${engine.http}/v1/data/${doc}?format=text&name=codemirror`)
    assert.equal(stored.status, 200)
    assert.equal(await stored.text(), text)
    assert.deepEqual([...alice.errors, ...bob.errors], [], 'no script errors on the pages')
  } catch (error) {
    await Promise.all([shoot(alice, 'failure-alice'), shoot(bob, 'failure-bob')]).catch(() => {})
    throw new Error(`${error.message}\nengine log:\n${engine.log().slice(-4000)}`, { cause: error })
  } finally {
    await alice.context().close()
    await bob.context().close()
    await engine.kill('SIGTERM')
  }
})

test('with tokens: names come from the session claim, and a page without a token says what to do', { skip: missing }, async () => {
  const secret = 'demo-e2e-secret-0123456789-abcdefgh'
  const engine = await startEngine({ args: ['--jwt-secret', secret] })
  const doc = 'team/notes'
  const token = (fullname) => mintToken(secret, {
    sub: fullname.toLowerCase(),
    exp: Math.floor(Date.now() / 1000) + 3600,
    access: { '/data/team/*': 'full' },
    session: { name: fullname.split(' ')[0].toLowerCase(), fullname }
  })
  const demo = `${engine.http}/demo/?doc=${doc}`
  const carol = await openPage(`${demo}#token=${token('Carol Chen')}`, 'carol')
  const dave = await openPage(`${demo}#token=${token('Dave Diaz')}`, 'dave')
  const stranger = await openPage(demo, 'stranger')
  try {
    await expectStatus(carol, 'connected')
    await expectStatus(dave, 'connected')
    await carol.locator('#people .person', { hasText: 'Dave Diaz' }).waitFor({ timeout: WAIT })
    await typeAtEnd(dave, 'Signed in.')
    await carol.locator('.cm-ySelectionInfo', { hasText: 'Dave Diaz' }).waitFor({ timeout: WAIT })
    await shoot(carol, '4-carol-with-token')

    // Refused in band: the page stops and tells the person what is missing.
    await expectStatus(stranger, 'failed')
    const notice = await stranger.locator('#notice').innerText()
    assert.match(notice, /needs a token/)
    assert.match(notice, /jwt\/missing/)
    await shoot(stranger, '5-no-token')
    assert.deepEqual([...carol.errors, ...dave.errors, ...stranger.errors], [])
  } catch (error) {
    throw new Error(`${error.message}\nengine log:\n${engine.log().slice(-4000)}`, { cause: error })
  } finally {
    for (const page of [carol, dave, stranger]) await page.context().close()
    await engine.kill('SIGTERM')
  }
})
