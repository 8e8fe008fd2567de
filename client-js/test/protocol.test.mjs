// Pure parts of the client, and the golden vectors shared with the Rust `protocol` crate.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import * as awarenessProtocol from 'y-protocols/awareness'
import { backoffDelay, isPermanent, tokenClaims, tokenExpiry, encodePersisted, MSG_PERSISTED } from '../dist/index.js'

const golden = JSON.parse(readFileSync(new URL('../../protocol/tests/golden.json', import.meta.url)))
const bytes = (hex) => Uint8Array.from(Buffer.from(hex, 'hex'))

test('backoff grows, is capped, and jitters within [0.5, 1.5)', () => {
  assert.equal(backoffDelay(0, 250, 10000, () => 0.5), 250)
  assert.equal(backoffDelay(3, 250, 10000, () => 0.5), 2000)
  assert.equal(backoffDelay(40, 250, 10000, () => 0.5), 10000)
  assert.equal(backoffDelay(1, 250, 10000, () => 0), 250)
  assert.equal(backoffDelay(1, 250, 10000, () => 0.999), 750)
})

test('close codes: the 4400 band is permanent', () => {
  for (const code of [4401, 4403, 4404, 4413]) assert.ok(isPermanent(code), `${code}`)
  for (const code of [1000, 1006, 1011, 1012, 1013, 4000, 4500]) assert.ok(!isPermanent(code), `${code}`)
})

test('token expiry is read from the payload', () => {
  const payload = Buffer.from(JSON.stringify({ exp: 1800000000 })).toString('base64url')
  assert.equal(tokenExpiry(`x.${payload}.y`), 1800000000 * 1000)
  assert.equal(tokenExpiry('not-a-token'), undefined)
  assert.equal(tokenExpiry('x.!!!.y'), undefined)
})

test('token claims decode UTF-8 and refuse what is not an object', () => {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url')
  const claims = tokenClaims(`x.${b64({ session: { fullname: 'Zoë Ångström 漢字' } })}.y`)
  assert.equal(claims.session.fullname, 'Zoë Ångström 漢字')
  assert.equal(tokenClaims(`x.${b64([1, 2])}.y`), undefined)
  assert.equal(tokenClaims(`x.${b64('text')}.y`), undefined)
  assert.equal(tokenClaims('x'), undefined)
})

test('golden vectors decode and re-encode byte for byte', () => {
  assert.equal(golden.vectors.length, 9)
  for (const v of golden.vectors) {
    const frame = bytes(v.hex)
    const d = decoding.createDecoder(frame)
    const e = encoding.createEncoder()
    const type = decoding.readVarUint(d)
    encoding.writeVarUint(e, type)
    switch (type) {
      case 0: {
        const sub = decoding.readVarUint(d)
        const payload = decoding.readVarUint8Array(d)
        encoding.writeVarUint(e, sub)
        encoding.writeVarUint8Array(e, payload)
        if (sub === 0) Y.decodeStateVector(payload)
        if (sub > 0) {
          const doc = new Y.Doc()
          Y.applyUpdate(doc, payload)
          assert.equal(doc.getText('content').toString(), 'éllo wörld ✓', v.name)
        }
        break
      }
      case 1: {
        const update = decoding.readVarUint8Array(d)
        const awareness = new awarenessProtocol.Awareness(new Y.Doc())
        awarenessProtocol.applyAwarenessUpdate(awareness, update, 'test')
        const state = awareness.getStates().get(v.client_id)
        assert.equal(state === undefined ? null : JSON.stringify(state), v.state ?? null, v.name)
        encoding.writeVarUint8Array(e, update)
        awareness.destroy()
        break
      }
      case 2: {
        assert.equal(decoding.readVarUint(d), 0)
        const reason = decoding.readVarString(d)
        assert.equal(reason, v.reason)
        encoding.writeVarUint(e, 0)
        encoding.writeVarString(e, reason)
        break
      }
      case 3:
        break
      case MSG_PERSISTED: {
        const body = decoding.readVarUint8Array(d)
        assert.equal(decoding.readVarUint(decoding.createDecoder(body)), v.through)
        assert.deepEqual(encodePersisted(v.through), frame)
        encoding.writeVarUint8Array(e, body)
        break
      }
      default:
        assert.fail(`unknown type ${type} in ${v.name}`)
    }
    assert.equal(decoding.hasContent(d), false, `${v.name}: trailing bytes`)
    assert.deepEqual(encoding.toUint8Array(e), frame, v.name)
  }
})
