// The provider against a real engine.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'
import WebSocket from 'ws'
import { SynchronyProvider } from '../dist/index.js'
import { startEngine, freePort, mintToken, waitFor } from './engine.mjs'

const provider = (url, doc, options = {}) =>
  new SynchronyProvider(url, doc, new Y.Doc(), { WebSocketPolyfill: WebSocket, minBackoffMs: 50, maxBackoffMs: 400, ...options })

test('two providers converge and report saved once the engine has it durable', async () => {
  const engine = await startEngine()
  const a = provider(engine.url, 'js/converge')
  const b = provider(engine.url, 'js/converge')
  const savedEvents = []
  a.on('saved', (s) => savedEvents.push(s))
  await waitFor('sync', () => a.synced && b.synced)
  assert.equal(a.status, 'connected')
  a.doc.getText('t').insert(0, 'hello ')
  b.doc.getText('t').insert(0, 'world ')
  await waitFor('convergence', () => a.doc.getText('t').length === 12 && a.doc.getText('t').toString() === b.doc.getText('t').toString())
  await waitFor('saved', () => a.saved && b.saved)
  assert.deepEqual(savedEvents.slice(0, 2), [false, true])
  a.destroy()
  b.destroy()
  await engine.kill('SIGTERM')
})

test('reconnects with backoff after the engine dies, and brings offline edits', async () => {
  const port = await freePort()
  let engine = await startEngine({ port })
  const a = provider(engine.url, 'js/restart')
  const b = provider(engine.url, 'js/restart')
  const statuses = []
  a.on('status', ({ status }) => statuses.push(status))
  await waitFor('sync', () => a.synced && b.synced)
  a.doc.getText('t').insert(0, 'before;')
  await waitFor('saved', () => a.saved)
  await engine.kill('SIGKILL')
  await waitFor('disconnect', () => a.status !== 'connected' && b.status !== 'connected')
  a.doc.getText('t').insert(7, 'offline;')
  assert.equal(a.saved, false)
  engine = await startEngine({ port, dataDir: engine.dataDir })
  await waitFor('reconnect and converge', () => a.synced && b.synced && b.doc.getText('t').toString() === 'before;offline;')
  await waitFor('saved again', () => a.saved)
  assert.ok(statuses.includes('disconnected') && statuses.at(-1) === 'connected', statuses.join(','))
  a.destroy()
  b.destroy()
  await engine.kill('SIGTERM')
})

test('a 4400-band close stops the provider with a permanent failure', async () => {
  const engine = await startEngine()
  const a = provider(engine.url, 'js/deleted')
  const failures = []
  a.on('permanent-failure', (f) => failures.push(f))
  await waitFor('sync', () => a.synced)
  const response = await fetch(`${engine.http}/v1/data/js/deleted`, { method: 'DELETE' })
  assert.equal(response.status, 200)
  await waitFor('permanent failure', () => failures.length === 1)
  assert.equal(failures[0].code, 4404)
  await new Promise((resolve) => setTimeout(resolve, 1000))
  assert.equal(a.status, 'disconnected', 'no reconnect after 4404')
  assert.equal(failures.length, 1)
  a.destroy()
  await engine.kill('SIGTERM')
})

test('tokens are refreshed before they expire, and after a 4401', async () => {
  const secret = 'js-test-secret-0123456789-abcdefgh'
  const engine = await startEngine({ args: ['--jwt-secret', secret, '--jwt-leeway-secs', '0'] })
  let minted = 0
  const getToken = (lifetime) => () => {
    minted++
    const now = Math.floor(Date.now() / 1000)
    return mintToken(secret, { iss: 'tests', exp: now + lifetime, access: { '/data/js/tokens': 'full' } })
  }
  // Refreshed one second before a three-second expiry.
  const early = provider(engine.url, 'js/tokens', { getToken: getToken(3), refreshBeforeExpiryMs: 1000 })
  await waitFor('sync', () => early.synced)
  await waitFor('a refresh', () => minted >= 2, 10000)
  await waitFor('reconnected with the new token', () => early.synced)
  early.doc.getText('t').insert(0, 'x')
  await waitFor('saved', () => early.saved)
  early.destroy()
  // Refresh scheduled long after expiry: the engine closes with 4401 first, and the provider
  // fetches a new token then.
  minted = 0
  const late = provider(engine.url, 'js/tokens', { getToken: getToken(2), refreshBeforeExpiryMs: -60000 })
  const failures = []
  late.on('permanent-failure', (f) => failures.push(f))
  await waitFor('sync', () => late.synced)
  await waitFor('a token after the 4401', () => minted >= 2, 10000)
  await waitFor('reconnected', () => late.synced)
  assert.deepEqual(failures, [])
  assert.match(engine.log(), /code=4401 reason=token expired/)
  late.destroy()
  await engine.kill('SIGTERM')
})

test('destroy leaves no timers or sockets behind', async () => {
  const engine = await startEngine()
  const before = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
  const a = provider(engine.url, 'js/destroy')
  await waitFor('sync', () => a.synced)
  a.destroy()
  await new Promise((resolve) => setTimeout(resolve, 200))
  const after = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
  assert.equal(after, before, 'timers left behind')
  assert.equal(a.status, 'disconnected')
  await engine.kill('SIGTERM')
})

test('a refused upgrade (503 while the engine starts) is retried, not thrown', { timeout: 30000 }, async () => {
  const { createServer } = await import('node:http')
  let upgrades = 0
  const server = createServer()
  server.on('upgrade', (_request, socket) => {
    upgrades++
    // The client may reset the connection as it reads the refusal (it retries at once): the
    // server's socket then reports ECONNRESET, which is no failure of the provider.
    socket.on('error', () => {})
    socket.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const p = provider(`ws://127.0.0.1:${server.address().port}/synchrony`, 'js/starting')
  await waitFor('three attempts', () => upgrades >= 3)
  assert.equal(p.failure, null, 'a 503 is transient')
  p.destroy()
  await new Promise((resolve) => server.close(resolve))
})
