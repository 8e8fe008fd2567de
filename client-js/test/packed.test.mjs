// The package as an app gets it: `npm pack` of this directory installed into a fresh app that
// has its own `yjs`. `yjs` is a peer dependency, so the app's copy must be the only one: Yjs
// breaks (and says "Yjs was already imported") when two copies load. The app pins the lowest
// yjs the peer range admits, a version other than this package's own devDependency, so an exact
// pin in `dependencies` would show up here as a second, nested copy.
//
// Needs the built package (`npm run build`) and the npm registry (through the npm cache).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdtempSync, mkdirSync, readFileSync, readdirSync, existsSync, realpathSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { promisify } from 'node:util'
import { startEngine } from './engine.mjs'

const run = promisify(execFile)
const CLIENT = new URL('..', import.meta.url).pathname
const pkg = JSON.parse(readFileSync(join(CLIENT, 'package.json'), 'utf8'))
const NPM_TIMEOUT = 300000
const YJS_TWICE = 'Yjs was already imported'

// The npm that runs this suite passes its per-run settings in the environment; the nested npm
// calls must find their own project (the temp app), not this one.
const npmEnv = Object.fromEntries(Object.entries(process.env).filter(([key]) =>
  !key.startsWith('npm_package_') && !key.startsWith('npm_lifecycle_') && key !== 'npm_config_local_prefix'))

async function npm (cwd, args) {
  try {
    return await run('npm', args, { cwd, env: npmEnv, timeout: NPM_TIMEOUT, maxBuffer: 64 << 20 })
  } catch (error) {
    throw new Error(`npm ${args.join(' ')} (in ${cwd}) failed: ${error.message}\n${error.stdout ?? ''}\n${error.stderr ?? ''}`)
  }
}

async function node (cwd, args, timeout = 120000) {
  try {
    return await run(process.execPath, args, { cwd, timeout, maxBuffer: 64 << 20 })
  } catch (error) {
    throw new Error(`node ${args.join(' ')} (in ${cwd}) failed: ${error.message}\n${error.stdout ?? ''}\n${error.stderr ?? ''}`)
  }
}

/** Every installed copy of the package `name` under `dir`/node_modules, nested ones included. */
function copiesOf (dir, name) {
  const found = []
  const walk = (modules) => {
    if (!existsSync(modules)) return
    for (const entry of readdirSync(modules, { withFileTypes: true })) {
      if (!entry.isDirectory() || entry.name.startsWith('.')) continue
      const at = join(modules, entry.name)
      if (entry.name.startsWith('@')) {
        for (const scoped of readdirSync(at, { withFileTypes: true })) {
          if (scoped.isDirectory()) visit(join(at, scoped.name), `${entry.name}/${scoped.name}`)
        }
      } else {
        visit(at, entry.name)
      }
    }
  }
  const visit = (at, packageName) => {
    if (packageName === name && existsSync(join(at, 'package.json'))) {
      found.push({ path: at, version: JSON.parse(readFileSync(join(at, 'package.json'), 'utf8')).version })
    }
    walk(join(at, 'node_modules'))
  }
  walk(join(dir, 'node_modules'))
  return found
}

/** The versions of `name` anywhere in an `npm ls --all --json` tree. */
function versionsInTree (tree, name, into = new Set()) {
  for (const [dep, info] of Object.entries(tree.dependencies ?? {})) {
    if (dep === name && info.version) into.add(info.version)
    versionsInTree(info, name, into)
  }
  return into
}

/** The directory of the `yjs` that code in `fromFile` gets. */
const yjsSeenFrom = (fromFile) => dirname(realpathSync(createRequire(fromFile).resolve('yjs/package.json')))

// What the app runs: its own Y.Doc handed to the package's provider, against a real engine. The
// console is captured before anything is imported (Yjs warns while it is being evaluated).
const APP_SCRIPT = `
const complaints = []
for (const level of ['warn', 'error']) {
  console[level] = (...args) => complaints.push(level + ': ' + args.map(String).join(' '))
}
const Y = await import('yjs')
const { SynchronyProvider } = await import('@synchrony/client')
const { default: WebSocket } = await import('ws')
const [url, docId] = process.argv.slice(2)
const options = { WebSocketPolyfill: WebSocket, minBackoffMs: 50, maxBackoffMs: 400 }
const docA = new Y.Doc()
const docB = new Y.Doc()
const a = new SynchronyProvider(url, docId, docA, options)
const b = new SynchronyProvider(url, docId, docB, options)
const until = async (what, predicate) => {
  const start = Date.now()
  while (!predicate()) {
    if (Date.now() - start > 30000) throw new Error('timed out waiting for ' + what)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}
await until('sync', () => a.synced && b.synced)
docA.getText('t').insert(0, 'from the app')
await until('round trip', () => docB.getText('t').toString() === 'from the app')
await until('saved', () => a.saved)
const result = {
  sameDoc: a.doc === docA,
  text: docB.getText('t').toString(),
  saved: a.saved,
  yjsVersionSeenByApp: (await import('node:module')).createRequire(import.meta.url)('yjs/package.json').version,
  complaints
}
a.destroy()
b.destroy()
process.stdout.write(JSON.stringify(result))
process.exit(0)
`

// The same check's control: a second copy of Yjs (this package's own devDependency) loaded next
// to the app's must make Yjs complain, or the absence above would prove nothing.
const CONTROL_SCRIPT = `
await import('yjs')
await import(process.argv[2])
`

// The package's types, as a TypeScript app sees them with its own yjs.
const APP_TS = `
import * as Y from 'yjs'
import { SynchronyProvider, type ProviderOptions } from '@synchrony/client'
const doc: Y.Doc = new Y.Doc()
const options: ProviderOptions = { connect: false, minBackoffMs: 50 }
const provider = new SynchronyProvider('ws://127.0.0.1:1/synchrony', 'js/types', doc, options)
const same: Y.Doc = provider.doc
same.getText('t').insert(0, 'typed')
provider.destroy()
`

test('the packed package installs next to an app\'s own yjs: one copy, and it works', { timeout: 900000 }, async () => {
  assert.ok(existsSync(join(CLIENT, 'dist', 'index.js')), 'dist/ is missing: run `npm run build` first')
  const peer = pkg.peerDependencies?.yjs
  assert.ok(peer, 'yjs is a peer dependency')
  assert.equal(pkg.dependencies?.yjs, undefined, 'yjs is not a dependency')
  const lowest = /^\^(\d+\.\d+\.\d+)$/.exec(peer)?.[1]
  assert.ok(lowest, `the peer range is a caret range (${peer})`)
  const ownYjs = pkg.devDependencies.yjs
  assert.notEqual(lowest, ownYjs, 'the app must use another yjs than the package\'s own, or a nested copy could not show')

  const root = mkdtempSync(join(tmpdir(), 'synchrony-packed-'))
  let engine
  try {
    // npm pack, as published.
    const packs = join(root, 'pack')
    mkdirSync(packs)
    const { stdout: packed } = await npm(CLIENT, ['pack', '--json', '--pack-destination', packs, '--loglevel=error'])
    const [{ filename, files }] = JSON.parse(packed)
    const shipped = files.map((f) => f.path)
    for (const file of ['package.json', 'dist/index.js', 'dist/index.d.ts', 'dist/provider.js']) {
      assert.ok(shipped.includes(file), `${file} is in the tarball (${shipped.join(', ')})`)
    }
    assert.ok(!shipped.some((f) => f.startsWith('src/') || f.startsWith('test/') || f.startsWith('node_modules/')), shipped.join(', '))

    // A fresh app with its own yjs, the packed package, and ws (Node 20 has no WebSocket).
    const app = join(root, 'app')
    mkdirSync(app)
    writeFileSync(join(app, 'package.json'), JSON.stringify({
      name: 'packed-app',
      version: '1.0.0',
      private: true,
      type: 'module',
      dependencies: {
        yjs: lowest,
        ws: pkg.devDependencies.ws,
        '@synchrony/client': `file:${join(packs, filename)}`
      }
    }, null, 2))
    await npm(app, ['install', '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error'])

    // (a) One yjs in the tree, the app's; one lib0 too (the caret ranges meet).
    const yjsCopies = copiesOf(app, 'yjs')
    assert.deepEqual(yjsCopies.map((c) => c.version), [lowest], JSON.stringify(yjsCopies))
    assert.equal(realpathSync(yjsCopies[0].path), realpathSync(join(app, 'node_modules', 'yjs')))
    const lib0Copies = copiesOf(app, 'lib0')
    assert.equal(lib0Copies.length, 1, JSON.stringify(lib0Copies))
    // npm agrees, and exits 0 (an unmet or invalid peer dependency would fail `npm ls`).
    const { stdout: listed } = await npm(app, ['ls', 'yjs', '--all', '--json'])
    assert.deepEqual([...versionsInTree(JSON.parse(listed), 'yjs')], [lowest], listed)
    // What the package and its y-protocols resolve is the app's yjs.
    const installed = join(app, 'node_modules', '@synchrony', 'client', 'package.json')
    const appYjs = yjsSeenFrom(join(app, 'package.json'))
    assert.equal(yjsSeenFrom(installed), appYjs)
    const yProtocols = realpathSync(createRequire(installed).resolve('y-protocols/package.json'))
    assert.equal(yjsSeenFrom(yProtocols), appYjs)
    assert.deepEqual(JSON.parse(readFileSync(installed, 'utf8')).peerDependencies, { yjs: peer })

    // (b) The app's Y.Doc with the package's provider against the engine: no duplicate-Yjs
    // complaint, and a text goes from one provider to the other and is saved.
    engine = await startEngine({ dataDir: join(root, 'engine-data') })
    writeFileSync(join(app, 'app.mjs'), APP_SCRIPT)
    const { stdout, stderr } = await node(app, ['app.mjs', engine.url, 'js/packed'])
    const result = JSON.parse(stdout)
    assert.deepEqual(result.complaints, [], 'nothing on console.warn/console.error')
    assert.ok(!stderr.includes(YJS_TWICE), stderr)
    assert.equal(result.sameDoc, true)
    assert.equal(result.text, 'from the app')
    assert.equal(result.saved, true)
    assert.equal(result.yjsVersionSeenByApp, lowest)

    // The control: a second Yjs is noticed.
    writeFileSync(join(app, 'control.mjs'), CONTROL_SCRIPT)
    const ownCopy = new URL('../node_modules/yjs/dist/yjs.mjs', import.meta.url).href
    const { stderr: controlErr } = await node(app, ['control.mjs', ownCopy])
    assert.ok(controlErr.includes(YJS_TWICE), `a second copy is detected: ${controlErr}`)

    // The types: the app's TypeScript accepts its Y.Doc for the package's provider.
    writeFileSync(join(app, 'app.ts'), APP_TS)
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
      compilerOptions: {
        target: 'ES2022',
        module: 'NodeNext',
        moduleResolution: 'NodeNext',
        lib: ['ES2022', 'DOM'],
        types: [],
        strict: true,
        noEmit: true,
        skipLibCheck: true
      },
      files: ['app.ts']
    }))
    await node(app, [join(CLIENT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'])
  } finally {
    await engine?.kill('SIGTERM')
    rmSync(root, { recursive: true, force: true })
  }
})
