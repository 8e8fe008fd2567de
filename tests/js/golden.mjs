// Generates protocol/tests/golden.json: y-sync and awareness frames encoded by the real
// yjs / y-protocols JavaScript implementation. The Rust protocol crate (and the TypeScript
// client) decode and re-encode these bytes in their tests.
//
// Run: node tests/js/golden.mjs   (from the repository root, after `npm ci` in tests/js)
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as authProtocol from 'y-protocols/auth'
import * as encoding from 'lib0/encoding'
import { writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const hex = (u8) => Buffer.from(u8).toString('hex')
const frame = (fn) => {
  const enc = encoding.createEncoder()
  fn(enc)
  return encoding.toUint8Array(enc)
}
const MSG_SYNC = 0
const MSG_AWARENESS = 1
const MSG_AUTH = 2
const MSG_QUERY_AWARENESS = 3

// A deterministic document: fixed client id, a text and a map.
const doc = new Y.Doc()
doc.clientID = 42
doc.getText('content').insert(0, 'héllo wörld ✓')
doc.getMap('meta').set('title', 'Golden')
doc.getText('content').delete(0, 1)

const empty = new Y.Doc()
empty.clientID = 7

const vectors = []
const push = (name, bytes, extra = {}) => vectors.push({ name, hex: hex(bytes), ...extra })

push('sync_step1_empty', frame((e) => { encoding.writeVarUint(e, MSG_SYNC); syncProtocol.writeSyncStep1(e, empty) }))
push('sync_step1_doc', frame((e) => { encoding.writeVarUint(e, MSG_SYNC); syncProtocol.writeSyncStep1(e, doc) }),
  { state_vector_hex: hex(Y.encodeStateVector(doc)) })
push('sync_step2_doc', frame((e) => { encoding.writeVarUint(e, MSG_SYNC); syncProtocol.writeSyncStep2(e, doc, new Uint8Array([0])) }),
  { update_hex: hex(Y.encodeStateAsUpdate(doc)), text: doc.getText('content').toString() })
const update = Y.encodeStateAsUpdate(doc)
push('sync_update', frame((e) => { encoding.writeVarUint(e, MSG_SYNC); syncProtocol.writeUpdate(e, update) }),
  { update_hex: hex(update) })

const awareness = new awarenessProtocol.Awareness(empty)
awareness.setLocalState({ user: { name: 'Ada', color: '#ff0000' } })
// The clock starts at 0 and setLocalState bumps it: fixed output.
push('awareness_update', frame((e) => {
  encoding.writeVarUint(e, MSG_AWARENESS)
  encoding.writeVarUint8Array(e, awarenessProtocol.encodeAwarenessUpdate(awareness, [empty.clientID]))
}), { client_id: empty.clientID, state: JSON.stringify(awareness.getLocalState()) })
awareness.setLocalState(null)
push('awareness_removal', frame((e) => {
  encoding.writeVarUint(e, MSG_AWARENESS)
  encoding.writeVarUint8Array(e, awarenessProtocol.encodeAwarenessUpdate(awareness, [empty.clientID]))
}), { client_id: empty.clientID })
awareness.destroy()

push('query_awareness', frame((e) => { encoding.writeVarUint(e, MSG_QUERY_AWARENESS) }))
push('auth_permission_denied', frame((e) => { encoding.writeVarUint(e, MSG_AUTH); authProtocol.writePermissionDenied(e, 'read-only document') }),
  { reason: 'read-only document' })

// Our extension, framed by lib0 like every y-sync message: varUint(100) • varByteArray(varUint(n)).
push('persisted_ack', frame((e) => {
  encoding.writeVarUint(e, 100)
  const body = encoding.createEncoder()
  encoding.writeVarUint(body, 300)
  encoding.writeVarUint8Array(e, encoding.toUint8Array(body))
}), { through: 300 })

const out = new URL('../../protocol/tests/golden.json', import.meta.url)
writeFileSync(fileURLToPath(out), JSON.stringify({ generator: 'tests/js/golden.mjs', yjs: '13.6.33', 'y-protocols': '1.0.7', vectors }, null, 2) + '\n')
console.log(`wrote ${vectors.length} vectors to ${fileURLToPath(out)}`)
