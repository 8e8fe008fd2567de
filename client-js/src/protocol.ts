// Wire details shared with the engine's `protocol` crate: message types, our persisted-ack
// extension, close-code bands and the reconnect backoff.
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'

export const MSG_SYNC = 0
export const MSG_AWARENESS = 1
export const MSG_AUTH = 2
export const MSG_QUERY_AWARENESS = 3
/** "Your first n update-bearing messages on this connection are durable": varUint(100) • varByteArray(varUint(n)). */
export const MSG_PERSISTED = 100

export function encodePersisted (n: number): Uint8Array {
  const body = encoding.createEncoder()
  encoding.writeVarUint(body, n)
  const frame = encoding.createEncoder()
  encoding.writeVarUint(frame, MSG_PERSISTED)
  encoding.writeVarUint8Array(frame, encoding.toUint8Array(body))
  return encoding.toUint8Array(frame)
}

/** Reads the body of a persisted ack (the decoder is past the message type). */
export function readPersisted (decoder: decoding.Decoder): number {
  const body = decoding.readVarUint8Array(decoder)
  return decoding.readVarUint(decoding.createDecoder(body))
}

/** 4400–4499: permanent, do not reconnect (4401 may succeed with a new token). */
export function isPermanent (code: number): boolean {
  return code >= 4400 && code < 4500
}

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential from `minMs`, capped at
 * `maxMs`, with jitter in [0.5, 1.5) so that many clients do not return in lock step.
 */
export function backoffDelay (attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const base = Math.min(maxMs, minMs * Math.pow(2, Math.min(attempt, 30)))
  return Math.round(base * (0.5 + random()))
}

/** The claims of a JWT, or undefined when it is not one. The token is not verified. */
export function tokenClaims (token: string): Record<string, unknown> | undefined {
  const payload = token.split('.')[1]
  if (!payload) return undefined
  try {
    const binary = globalThis.atob(payload.replace(/-/g, '+').replace(/_/g, '/'))
    const json: unknown = JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))))
    return typeof json === 'object' && json !== null && !Array.isArray(json) ? json as Record<string, unknown> : undefined
  } catch {
    return undefined
  }
}

/** The `exp` claim of a JWT, in ms since the epoch, or undefined. The token is not verified. */
export function tokenExpiry (token: string): number | undefined {
  const exp = tokenClaims(token)?.exp
  return typeof exp === 'number' ? exp * 1000 : undefined
}
