// A Yjs provider for the synchrony engine.
//
// Beyond the stock y-websocket provider it knows the engine's contract: it asks for persisted
// acknowledgements and turns them into an honest `saved` state; it retries only transient
// closes (with exponential backoff and jitter) and stops on the 4400 band with a
// `permanent-failure` event; it fetches a new token on 4401 and shortly before the token expires.
import * as Y from 'yjs'
import * as syncProtocol from 'y-protocols/sync'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import { Observable } from 'lib0/observable'
import {
  MSG_AUTH, MSG_AWARENESS, MSG_PERSISTED, MSG_QUERY_AWARENESS, MSG_SYNC,
  backoffDelay, isPermanent, readPersisted, tokenExpiry
} from './protocol.js'

export type Status = 'connecting' | 'connected' | 'disconnected'

export interface PermanentFailure {
  code: number
  reason: string
}

export interface ProviderOptions {
  /** A token for the engine (see `getToken` for one that refreshes). */
  token?: string
  /** Called for the first token, on 4401, and shortly before the current token expires. */
  getToken?: () => string | Promise<string>
  awareness?: awarenessProtocol.Awareness
  /** Extra query parameters. */
  params?: Record<string, string>
  /** Connect at once (default true). */
  connect?: boolean
  /** A WebSocket implementation (for Node: the `ws` package). */
  WebSocketPolyfill?: typeof WebSocket
  minBackoffMs?: number
  maxBackoffMs?: number
  /** Fetch a new token this long before the current one expires. */
  refreshBeforeExpiryMs?: number
  /** Reconnect when nothing arrived for this long (the engine echoes awareness every 15 s). */
  messageTimeoutMs?: number
}

type Events = {
  status: (event: { status: Status }) => void
  synced: (synced: boolean) => void
  saved: (saved: boolean) => void
  'permanent-failure': (failure: PermanentFailure) => void
  'permission-denied': (reason: string) => void
}

export class SynchronyProvider extends Observable<keyof Events> {
  readonly doc: Y.Doc
  readonly awareness: awarenessProtocol.Awareness
  status: Status = 'disconnected'
  synced = false
  /** Every local change is acknowledged as durable by the engine. */
  saved = true
  /** Set after a 4400-band close: the provider does not reconnect by itself. */
  failure: PermanentFailure | null = null

  private readonly url: string
  private readonly options: ProviderOptions
  private readonly WS: typeof WebSocket
  private ws: WebSocket | null = null
  private token: string | undefined
  private shouldConnect = false
  private attempt = 0
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null
  private refreshTimer: ReturnType<typeof setTimeout> | null = null
  private livenessTimer: ReturnType<typeof setInterval> | null = null
  private lastMessage = 0
  // Acknowledgement bookkeeping, per connection: messages sent that carry updates, the one
  // that carried the latest local change, and the highest acknowledged.
  private sent = 0
  private lastLocal = 0
  private acked = 0
  private pendingOffline = false

  constructor (serviceUrl: string, docId: string, doc: Y.Doc, options: ProviderOptions = {}) {
    super()
    this.url = `${serviceUrl.replace(/\/$/, '')}/v1/ws/${docId}`
    this.doc = doc
    this.options = options
    this.awareness = options.awareness ?? new awarenessProtocol.Awareness(doc)
    this.token = options.token
    const WS = options.WebSocketPolyfill ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket
    if (!WS) throw new Error('no WebSocket: pass options.WebSocketPolyfill')
    this.WS = WS
    doc.on('update', this.onDocUpdate)
    this.awareness.on('update', this.onAwarenessUpdate)
    if (options.connect !== false) this.connect()
  }

  connect (): void {
    this.shouldConnect = true
    this.failure = null
    if (!this.ws && !this.reconnectTimer) void this.open()
  }

  /** Closes the connection and stops reconnecting; local edits are kept and sent on connect(). */
  disconnect (): void {
    this.shouldConnect = false
    this.clearTimers()
    this.ws?.close(1000, 'client disconnect')
  }

  /** Disconnects and removes every listener and timer. */
  override destroy (): void {
    awarenessProtocol.removeAwarenessStates(this.awareness, [this.doc.clientID], this)
    this.disconnect()
    this.doc.off('update', this.onDocUpdate)
    this.awareness.off('update', this.onAwarenessUpdate)
    if (!this.options.awareness) this.awareness.destroy()
    super.destroy()
  }

  private clearTimers (): void {
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer)
    if (this.refreshTimer) clearTimeout(this.refreshTimer)
    if (this.livenessTimer) clearInterval(this.livenessTimer)
    this.reconnectTimer = this.refreshTimer = this.livenessTimer = null
  }

  private setStatus (status: Status): void {
    if (this.status !== status) {
      this.status = status
      this.emit('status', [{ status }])
    }
  }

  private setSaved (saved: boolean): void {
    if (this.saved !== saved) {
      this.saved = saved
      this.emit('saved', [saved])
    }
  }

  private async refreshToken (): Promise<void> {
    if (this.options.getToken) this.token = await this.options.getToken()
  }

  private async open (): Promise<void> {
    if (!this.shouldConnect) return
    if (this.token === undefined && this.options.getToken) {
      try {
        await this.refreshToken()
      } catch {
        this.scheduleReconnect()
        return
      }
      if (!this.shouldConnect) return
    }
    const params = new URLSearchParams({ ...this.options.params, ack: 'persisted' })
    if (this.token) params.set('token', this.token)
    const ws = new this.WS(`${this.url}?${params}`)
    ws.binaryType = 'arraybuffer'
    this.ws = ws
    this.setStatus('connecting')
    let opened = false
    ws.onopen = () => {
      opened = true
      this.sent = 0
      this.acked = 0
      this.lastLocal = 0
      this.lastMessage = Date.now()
      this.setStatus('connected')
      const encoder = encoding.createEncoder()
      encoding.writeVarUint(encoder, MSG_SYNC)
      syncProtocol.writeSyncStep1(encoder, this.doc)
      ws.send(encoding.toUint8Array(encoder))
      if (this.awareness.getLocalState() !== null) {
        this.send(MSG_AWARENESS, awarenessProtocol.encodeAwarenessUpdate(this.awareness, [this.doc.clientID]))
      }
      this.scheduleRefresh()
      const timeout = this.options.messageTimeoutMs ?? 30000
      this.livenessTimer = setInterval(() => {
        if (Date.now() - this.lastMessage > timeout) ws.close(4000, 'no message from the server')
      }, Math.min(timeout, 5000))
    }
    // A failed connection (a refused upgrade, say 503 while the engine starts) is followed by
    // close, which decides what happens next. Node's `ws` throws an 'error' nobody listens to.
    ws.onerror = () => {}
    ws.onmessage = (event: MessageEvent) => {
      this.lastMessage = Date.now()
      this.onMessage(new Uint8Array(event.data as ArrayBuffer))
    }
    ws.onclose = (event: CloseEvent) => {
      this.ws = null
      this.clearTimers()
      if (this.synced) {
        this.synced = false
        this.emit('synced', [false])
      }
      // Whatever was sent but not acknowledged goes again with the next step 2.
      if (this.acked < this.lastLocal) this.pendingOffline = true
      this.setStatus('disconnected')
      awarenessProtocol.removeAwarenessStates(
        this.awareness,
        Array.from(this.awareness.getStates().keys()).filter((id) => id !== this.doc.clientID),
        this
      )
      void this.onClose(event.code, event.reason, opened)
    }
  }

  private async onClose (code: number, reason: string, opened: boolean): Promise<void> {
    if (!this.shouldConnect) return
    if (code === 4401 && this.options.getToken) {
      // The token expired or was refused: get a new one and come straight back.
      try {
        await this.refreshToken()
        this.attempt = 0
        void this.open()
        return
      } catch {
        // fall through to a permanent failure
      }
    }
    if (isPermanent(code)) {
      this.shouldConnect = false
      this.failure = { code, reason }
      this.emit('permanent-failure', [this.failure])
      return
    }
    // A refused upgrade shows up as a close before open; the token may be the reason.
    if (!opened && this.options.getToken && this.attempt > 0) {
      try {
        await this.refreshToken()
      } catch {
        // keep the old token; the backoff applies either way
      }
    }
    this.scheduleReconnect()
  }

  private scheduleReconnect (): void {
    if (!this.shouldConnect || this.reconnectTimer) return
    const delay = backoffDelay(this.attempt++, this.options.minBackoffMs ?? 250, this.options.maxBackoffMs ?? 10000)
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null
      void this.open()
    }, delay)
  }

  /** Shortly before the token expires, get a new one and reconnect with it. */
  private scheduleRefresh (): void {
    if (!this.options.getToken || !this.token) return
    const expiry = tokenExpiry(this.token)
    if (expiry === undefined) return
    const at = expiry - (this.options.refreshBeforeExpiryMs ?? 30000) - Date.now()
    this.refreshTimer = setTimeout(() => {
      void this.refreshToken().then(() => this.ws?.close(1000, 'token refresh'), () => {})
    }, Math.max(0, at))
  }

  private send (type: number, payload: Uint8Array): void {
    const encoder = encoding.createEncoder()
    encoding.writeVarUint(encoder, type)
    encoding.writeVarUint8Array(encoder, payload)
    this.ws?.send(encoding.toUint8Array(encoder))
  }

  private onMessage (data: Uint8Array): void {
    const decoder = decoding.createDecoder(data)
    const type = decoding.readVarUint(decoder)
    switch (type) {
      case MSG_SYNC: {
        const encoder = encoding.createEncoder()
        encoding.writeVarUint(encoder, MSG_SYNC)
        const kind = syncProtocol.readSyncMessage(decoder, encoder, this.doc, this)
        if (encoding.length(encoder) > 1) {
          // Our step 2 answer to the server's step 1: it carries what we did offline.
          this.ws?.send(encoding.toUint8Array(encoder))
          this.sent++
          if (this.pendingOffline) {
            this.lastLocal = this.sent
            this.pendingOffline = false
          }
          this.updateSaved()
        }
        if (kind === syncProtocol.messageYjsSyncStep2 && !this.synced) {
          this.synced = true
          this.attempt = 0
          this.emit('synced', [true])
        }
        break
      }
      case MSG_AWARENESS:
        awarenessProtocol.applyAwarenessUpdate(this.awareness, decoding.readVarUint8Array(decoder), this)
        break
      case MSG_QUERY_AWARENESS:
        this.send(MSG_AWARENESS, awarenessProtocol.encodeAwarenessUpdate(this.awareness, Array.from(this.awareness.getStates().keys())))
        break
      case MSG_AUTH:
        if (decoding.readVarUint(decoder) === 0) this.emit('permission-denied', [decoding.readVarString(decoder)])
        break
      case MSG_PERSISTED:
        this.acked = Math.max(this.acked, readPersisted(decoder))
        this.updateSaved()
        break
      default:
        // Unknown extension: ignore, so that newer engines do not break older clients.
        break
    }
  }

  private updateSaved (): void {
    this.setSaved(!this.pendingOffline && this.acked >= this.lastLocal)
  }

  private onDocUpdate = (update: Uint8Array, origin: unknown): void => {
    if (origin === this) return
    if (this.ws && this.ws.readyState === 1 && this.synced) {
      const encoder = encoding.createEncoder()
      encoding.writeVarUint(encoder, MSG_SYNC)
      syncProtocol.writeUpdate(encoder, update)
      this.ws.send(encoding.toUint8Array(encoder))
      this.sent++
      this.lastLocal = this.sent
    } else {
      // Sent with the step 2 of the next connection (or of this one, before sync completes).
      this.pendingOffline = true
    }
    this.setSaved(false)
  }

  private onAwarenessUpdate = (
    { added, updated, removed }: { added: number[], updated: number[], removed: number[] },
    origin: unknown
  ): void => {
    if (origin === this || !this.ws || this.ws.readyState !== 1) return
    const changed = added.concat(updated, removed)
    this.send(MSG_AWARENESS, awarenessProtocol.encodeAwarenessUpdate(this.awareness, changed))
  }
}
