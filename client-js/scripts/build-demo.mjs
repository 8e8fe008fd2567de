// Builds the demo editor page into synchrony/assets/demo/, where the engine embeds it (so that
// `cargo build` never needs npm). `--check` builds in memory and fails when the committed
// assets differ: run `npm run build:demo` after changing demo/ or src/.
import { build } from 'esbuild'
import { readFileSync, writeFileSync, mkdirSync, existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = dirname(dirname(fileURLToPath(import.meta.url)))
const out = join(root, '..', 'synchrony', 'assets', 'demo')
const check = process.argv.includes('--check')

const bundle = await build({
  entryPoints: [join(root, 'demo', 'main.ts')],
  bundle: true,
  format: 'esm',
  target: ['es2022'],
  minify: true,
  legalComments: 'eof',
  charset: 'utf8',
  write: false,
  logLevel: 'warning'
})

const files = {
  'index.html': readFileSync(join(root, 'demo', 'index.html')),
  'demo.css': readFileSync(join(root, 'demo', 'demo.css')),
  'demo.js': Buffer.from(bundle.outputFiles[0].contents)
}

if (check) {
  const stale = Object.entries(files).filter(([name, bytes]) => {
    const path = join(out, name)
    return !existsSync(path) || !readFileSync(path).equals(bytes)
  }).map(([name]) => name)
  if (stale.length) {
    console.error(`synchrony/assets/demo is stale (${stale.join(', ')}): run \`npm run build:demo\` in client-js/ and commit the result`)
    process.exit(1)
  }
  console.log('synchrony/assets/demo matches its sources')
} else {
  mkdirSync(out, { recursive: true })
  for (const [name, bytes] of Object.entries(files)) writeFileSync(join(out, name), bytes)
  console.log(`wrote ${Object.entries(files).map(([n, b]) => `${n} (${b.length} bytes)`).join(', ')} to ${out}`)
}
