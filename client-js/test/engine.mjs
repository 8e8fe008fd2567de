// Starts a real engine (`target/debug/synchrony`, or $SYNCHRONY_BIN) for the provider tests.
import { spawn } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { createServer } from 'node:net'
import { createHmac } from 'node:crypto'

const BIN = process.env.SYNCHRONY_BIN || new URL('../../target/debug/synchrony', import.meta.url).pathname

export async function freePort () {
  return new Promise((resolve) => {
    const server = createServer()
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

/** Starts `synchrony serve` and resolves once it printed its ready line. */
export async function startEngine ({ port = 0, dataDir = mkdtempSync(join(tmpdir(), 'synchrony-js-')), args = [] } = {}) {
  const child = spawn(BIN, ['serve', '--port', String(port), '--data-dir', dataDir, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, SYNCHRONY_DATABASE_URL: '', SYNCHRONY_LOG: 'info,synchrony=debug' }
  })
  let log = ''
  child.stderr.on('data', (d) => { log += d })
  const lines = createInterface({ input: child.stdout })
  const ready = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`engine not ready in 30 s:\n${log}`)), 30000)
    lines.on('line', (line) => {
      if (line.includes('"event":"ready"')) {
        clearTimeout(timer)
        resolve(JSON.parse(line))
      }
    })
    child.on('exit', (code) => reject(new Error(`engine exited (${code}):\n${log}`)))
  })
  const exited = new Promise((resolve) => child.on('exit', resolve))
  return {
    port: ready.port,
    dataDir,
    url: `ws://127.0.0.1:${ready.port}/synchrony`,
    http: `http://127.0.0.1:${ready.port}/synchrony`,
    log: () => log,
    kill: async (signal = 'SIGKILL') => { child.kill(signal); await exited }
  }
}

/** An HS256 token, as a host would mint it. */
export function mintToken (secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

export async function waitFor (what, predicate, ms = 20000) {
  const start = Date.now()
  while (!predicate()) {
    if (Date.now() - start > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}
