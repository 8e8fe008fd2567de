// Real Yjs clients (npm `yjs` + `y-websocket` under Node with `ws`) driven by the Rust tests.
//
//   node interop.mjs <scenario> <serviceUrl> <docId> [args...]
//
// serviceUrl is `ws://127.0.0.1:PORT/synchrony`. Prints one JSON line with the outcome and exits
// non-zero with a message on failure. Every wait is bounded.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { Schema } from 'prosemirror-model'
import { prosemirrorJSONToYDoc, yXmlFragmentToProseMirrorRootNode } from 'y-prosemirror'

const [scenario, serviceUrl, docId, ...args] = process.argv.slice(2)
const WAIT_MS = Number(process.env.INTEROP_WAIT_MS || 20000)

function fail (message) {
  console.error(`FAIL ${scenario}: ${message}`)
  process.exit(1)
}

async function waitFor (what, predicate, ms = WAIT_MS) {
  const start = Date.now()
  while (!predicate()) {
    if (Date.now() - start > ms) fail(`timed out after ${ms} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

function client (name, { connect = true, params = {} } = {}) {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(`${serviceUrl}/v1/ws`, docId, doc, {
    WebSocketPolyfill: WebSocket,
    connect,
    params,
    disableBc: true,
    maxBackoffTime: 500
  })
  provider.awareness.setLocalStateField('user', { name })
  return { name, doc, provider, text: doc.getText('content'), map: doc.getMap('meta') }
}

const synced = (c) => c.provider.synced
const sameState = (clients) => {
  const texts = clients.map((c) => c.text.toString())
  const maps = clients.map((c) => JSON.stringify(c.map.toJSON(), Object.keys(c.map.toJSON()).sort()))
  return texts.every((t) => t === texts[0]) && maps.every((m) => m === maps[0])
}
const awarenessNames = (c) => [...c.provider.awareness.getStates().values()].map((s) => s.user?.name).filter(Boolean).sort()

const scenarios = {
  // Several clients edit a text and a map at once and converge; presence comes and goes;
  // a client that edited offline brings its edits on reconnect.
  async converge () {
    const n = Number(args[0] || 3)
    const clients = Array.from({ length: n }, (_, i) => client(`c${i}`))
    await waitFor('all clients synced', () => clients.every(synced))
    for (let round = 0; round < 20; round++) {
      clients.forEach((c, i) => {
        c.text.insert(Math.min(c.text.length, round % 5), `${c.name}r${round};`)
        c.map.set(`k${round % 4}`, `${c.name}-${round}`)
        if (round % 7 === 6 && c.text.length > 3) c.text.delete(1, 2)
        c.map.set(`own-${i}`, round)
      })
      await new Promise((resolve) => setTimeout(resolve, 5))
    }
    await waitFor('texts and maps to converge', () => sameState(clients))
    const names = clients.map((c) => c.name).sort()
    await waitFor('everyone to see everyone in awareness',
      () => clients.every((c) => JSON.stringify(awarenessNames(c)) === JSON.stringify(names)))

    // A client leaves: the others drop its presence.
    const leaver = clients.pop()
    leaver.provider.destroy()
    const remaining = clients.map((c) => c.name).sort()
    await waitFor('the leaver to disappear from awareness',
      () => clients.every((c) => JSON.stringify(awarenessNames(c)) === JSON.stringify(remaining)))

    // Offline edits: disconnect, edit, reconnect.
    const offline = clients[0]
    offline.provider.disconnect()
    offline.text.insert(0, 'OFFLINE;')
    offline.map.set('offline', true)
    // An edit made after it by a connected client reaches the others: had the offline edit
    // leaked, it would have been there first.
    clients[1].map.set('after-offline', true)
    await waitFor('the connected edit after the offline one',
      () => clients.slice(1).every((c) => c.map.get('after-offline') === true))
    if (clients.slice(1).some((c) => c.text.toString().includes('OFFLINE'))) fail('offline edit leaked before reconnect')
    if (offline.map.get('after-offline') !== undefined) fail('the disconnected client still receives')
    offline.provider.connect()
    await waitFor('offline edits to reach the others',
      () => clients.every((c) => c.text.toString().startsWith('OFFLINE;') && c.map.get('offline') === true))
    await waitFor('final convergence', () => sameState(clients))
    const result = { text: clients[0].text.toString(), map: clients[0].map.toJSON(), clients: n }
    clients.forEach((c) => c.provider.destroy())
    return result
  },

  // The host-application flow: two editors with their own tokens edit; the host publishes a
  // change made outside the editor (reset), reads the draft, then deletes the page.
  //   args: tokenA tokenB adminToken
  async host () {
    const [tokenA, tokenB, admin] = args
    const http = serviceUrl.replace(/^ws/, 'http')
    const api = (method, path, body) => fetch(`${http}/v1/data/${docId}${path}`, {
      method, body, headers: { authorization: `Bearer ${admin}` }
    })
    const a = client('ada', { params: { token: tokenA } })
    const b = client('bob', { params: { token: tokenB } })
    const closes = { ada: [], bob: [] }
    for (const c of [a, b]) {
      c.provider.on('connection-close', (event) => {
        closes[c.name].push(event?.code)
        // A stock provider would reconnect even after 4404; stop it as our client does.
        if (event?.code >= 4400 && event?.code < 4500) c.provider.destroy()
      })
    }
    await waitFor('both synced', () => synced(a) && synced(b))
    a.text.insert(0, 'draft by ada. ')
    b.text.insert(0, 'draft by bob. ')
    await waitFor('drafts to converge', () => sameState([a, b]) && a.text.length > 20)

    const put = await api('PUT', '?reset=true&name=content', 'Published version')
    if (put.status !== 200) fail(`reset answered ${put.status}: ${await put.text()}`)
    const head = (await put.json()).head
    await waitFor('the reset to reach both editors',
      () => a.text.toString() === 'Published version' && b.text.toString() === 'Published version')

    const got = await api('GET', '')
    const draft = await got.json()
    if (draft.state.content !== 'Published version') fail(`draft reads ${JSON.stringify(draft)}`)
    const names = draft.sessions.map((s) => s.name).sort().join(',')

    const del = await api('DELETE', '')
    if (del.status !== 200) fail(`delete answered ${del.status}: ${await del.text()}`)
    await waitFor('both editors closed with 4404', () => closes.ada.includes(4404) && closes.bob.includes(4404))
    return { head, names, closes }
  },

  // Two editors type for a while (the engine may die and come back meanwhile), then converge.
  //   args: token durationMs
  async editing () {
    const [token, durationMs] = args
    const editors = [client('ed1', { params: { token } }), client('ed2', { params: { token } })]
    await waitFor('both synced', () => editors.every(synced))
    const made = { ed1: [], ed2: [] }
    const end = Date.now() + Number(durationMs)
    let i = 0
    while (Date.now() < end) {
      for (const c of editors) {
        const marker = `[${c.name}:${i}]`
        c.text.insert(c.text.length, marker)
        made[c.name].push(marker)
      }
      i++
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    await waitFor('editors to reconnect and converge',
      () => editors.every((c) => c.provider.wsconnected && c.provider.synced) && sameState(editors), 45000)
    const text = editors[0].text.toString()
    const missing = [...made.ed1, ...made.ed2].filter((m) => !text.includes(m))
    if (missing.length) fail(`${missing.length} edits missing after convergence, e.g. ${missing.slice(0, 3)}`)
    editors.forEach((c) => c.provider.destroy())
    return { edits: made.ed1.length + made.ed2.length, text }
  },

  // A client joins a document whose state is far larger than one WebSocket frame (the engine
  // sends it in fragments) and reports the length and FNV-1a hash of the text it synced (a
  // megabyte on stdout would be cut short by process.exit).
  async large () {
    const c = client('large')
    await waitFor('sync', () => synced(c))
    const text = c.text.toString()
    c.provider.destroy()
    let fnv1a = 0x811c9dc5
    for (let i = 0; i < text.length; i++) {
      fnv1a = Math.imul(fnv1a ^ text.charCodeAt(i), 0x01000193) >>> 0
    }
    return { length: text.length, fnv1a }
  },

  // A stock client never receives an extension message, even when other clients ask for acks.
  // The operators' acceptance procedure: create a page and edit it (through whatever sits in
  // front, a load balancer in the cluster test) with several stock clients; print its text.
  async page () {
    const n = Number(args[0] || 3)
    const clients = Array.from({ length: n }, (_, i) => client(`editor${i}`))
    await waitFor('all editors synced', () => clients.every(synced))
    clients[0].text.insert(0, 'Created through the load balancer. ')
    await waitFor('the page to reach every editor',
      () => clients.every((c) => c.text.toString().startsWith('Created')))
    for (let round = 0; round < 10; round++) {
      clients.forEach((c) => c.text.insert(c.text.length, `${c.name}.${round} `))
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await waitFor('the editors to converge', () => sameState(clients))
    const text = clients[0].text.toString()
    clients.forEach((c) => c.provider.destroy())
    return { text }
  },

  // Several editors type for a while (through a load balancer, while the test kills a node);
  // afterwards all hold every edit any of them made. Prints the text.
  async typing () {
    const n = Number(args[0] || 3)
    const secs = Number(args[1] || 5)
    const clients = Array.from({ length: n }, (_, i) => client(`typist${i}`))
    // Connections each typist lost (its node killed) and came back from.
    clients.forEach((c) => {
      c.drops = 0
      c.provider.on('status', ({ status }) => { if (status === 'disconnected') c.drops++ })
    })
    await waitFor('all typists synced', () => clients.every(synced))
    const markers = []
    const end = Date.now() + secs * 1000
    for (let round = 0; Date.now() < end; round++) {
      clients.forEach((c) => {
        const marker = `<${c.name}.${round}>`
        c.text.insert(c.text.length, marker)
        markers.push(marker)
      })
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    await waitFor('every typist to hold every edit', () => clients.every((c) => {
      const text = c.text.toString()
      return markers.every((m) => text.includes(m))
    }), 40000)
    await waitFor('the typists to converge', () => sameState(clients))
    const text = clients[0].text.toString()
    const reconnected = clients.filter((c) => c.drops > 0).length
    clients.forEach((c) => c.provider.destroy())
    return { text, edits: markers.length, reconnected }
  },

  // A rich-text page as y-prosemirror keeps it (block elements holding XML texts, marks as
  // formatting), read back through the REST API; a text reset aimed at it must be refused
  // while its editors stay connected, and the page must come through untouched.
  async richtext () {
    const http = serviceUrl.replace(/^ws/, 'http')
    const url = (query) => `${http}/v1/data/${docId}?${query}`
    const a = client('writer')
    const b = client('reader')
    await waitFor('sync', () => synced(a) && synced(b))
    const page = a.doc.getXmlFragment('prosemirror')
    a.doc.transact(() => {
      const heading = new Y.XmlElement('heading')
      heading.setAttribute('level', '1')
      heading.insert(0, [new Y.XmlText('Title')])
      const paragraph = new Y.XmlElement('paragraph')
      const text = new Y.XmlText()
      paragraph.insert(0, [text])
      page.insert(0, [heading, paragraph])
      text.insert(0, 'Hello ')
      text.insert(6, 'world', { bold: {} })
    })
    const expected = page.toString()
    await waitFor('the page to reach the other editor',
      () => b.doc.getXmlFragment('prosemirror').toString() === expected)
    const xml = await (await fetch(url('format=xml&name=prosemirror'))).text()
    const text = await (await fetch(url('format=text&name=prosemirror'))).text()
    const refused = await fetch(url('reset=true&name=prosemirror'), { method: 'PUT', body: 'oops' })
    const refusal = await refused.json()
    // A change that does go through, to know the refused one had its turn before it.
    const marker = await fetch(url('reset=true&name=content'), { method: 'PUT', body: 'marker' })
    if (marker.status !== 200) fail(`the marker reset answered ${marker.status}`)
    await waitFor('the marker', () => a.text.toString() === 'marker' && b.text.toString() === 'marker')
    const wrongFormat = await fetch(url('format=xml&name=content'))
    const strings = b.doc.getXmlFragment('prosemirror').toArray()
      .filter((n) => !(n instanceof Y.XmlElement)).length
    const after = b.doc.getXmlFragment('prosemirror').toString()
    a.provider.destroy()
    b.provider.destroy()
    return {
      yjs_xml: expected,
      engine_xml: xml,
      engine_text: text,
      refused: refused.status,
      refusal,
      xml_of_text_root: wrongFormat.status,
      after,
      non_elements: strings
    }
  },

  // A real y-prosemirror page: made from ProseMirror JSON by y-prosemirror, read through REST
  // as XML, replaced from edited XML (marks named), and read back by y-prosemirror's own
  // Yjs-to-ProseMirror conversion, which must build a valid document from it.
  async prosemirror () {
    const http = serviceUrl.replace(/^ws/, 'http')
    const url = (query) => `${http}/v1/data/${docId}?${query}`
    const schema = new Schema({
      nodes: {
        doc: { content: 'block+' },
        paragraph: { group: 'block', content: 'inline*' },
        heading: { group: 'block', content: 'inline*', attrs: { level: { default: 1 } } },
        text: { group: 'inline' }
      },
      marks: { strong: {}, em: {}, link: { attrs: { href: {} } } }
    })
    const a = client('author')
    const b = client('reader')
    await waitFor('sync', () => synced(a) && synced(b))
    const draft = {
      type: 'doc',
      content: [
        { type: 'heading', attrs: { level: 1 }, content: [{ type: 'text', text: 'Draft' }] },
        {
          type: 'paragraph',
          content: [
            { type: 'text', text: 'Some ' },
            { type: 'text', text: 'bold', marks: [{ type: 'strong' }] },
            { type: 'text', text: ' words' }
          ]
        }
      ]
    }
    Y.applyUpdate(a.doc, Y.encodeStateAsUpdate(prosemirrorJSONToYDoc(schema, draft, 'prosemirror')))
    a.text.insert(0, 'plain')
    const made = a.doc.getXmlFragment('prosemirror').toString()
    await waitFor('the page to reach the reader',
      () => b.doc.getXmlFragment('prosemirror').toString() === made && b.text.toString() === 'plain')
    const xml = await (await fetch(url('format=xml&name=prosemirror'))).text()
    const text = await (await fetch(url('format=text&name=prosemirror'))).text()
    const edited = xml.replace('Draft', 'Final') +
      '\n  <paragraph>See <link href="https://example.com/a?b=1&amp;c=2">this <em>page</em></link></paragraph>\n'
    const reset = await fetch(url('reset=true&name=prosemirror&format=xml&marks=strong,em,link'),
      { method: 'PUT', body: edited })
    const resetBody = await reset.text()
    if (reset.status !== 200) fail(`the XML reset answered ${reset.status}: ${resetBody}`)
    await waitFor('the reset to reach both editors', () =>
      [a, b].every((c) => c.doc.getXmlFragment('prosemirror').toString().includes('Final')))
    const node = yXmlFragmentToProseMirrorRootNode(b.doc.getXmlFragment('prosemirror'), schema)
    node.check()
    const textReset = await fetch(url('reset=true&name=prosemirror'), { method: 'PUT', body: 'oops' })
    const xmlIntoText = await fetch(url('reset=true&name=content&format=xml'),
      { method: 'PUT', body: '<paragraph>x</paragraph>' })
    const malformed = await fetch(url('reset=true&name=prosemirror&format=xml'),
      { method: 'PUT', body: '<paragraph>unclosed' })
    const markHoldingNode = await fetch(url('reset=true&name=prosemirror&format=xml&marks=strong'),
      { method: 'PUT', body: '<paragraph><strong><paragraph>x</paragraph></strong></paragraph>' })
    // The refusals changed nothing: a marker written after them arrives after them.
    a.text.insert(a.text.length, '!')
    await waitFor('the marker', () => b.text.toString() === 'plain!')
    const after = b.doc.getXmlFragment('prosemirror').toString()
    a.provider.destroy()
    b.provider.destroy()
    return {
      made,
      engine_xml: xml,
      engine_text: text,
      doc: node.toJSON(),
      text_content: node.textContent,
      after_reset: a.doc.getXmlFragment('prosemirror').toString(),
      after,
      refusals: {
        text_into_rich_text: [textReset.status, (await textReset.json()).type],
        xml_into_text: [xmlIntoText.status, (await xmlIntoText.json()).type],
        malformed: [malformed.status, (await malformed.json()).type],
        node_in_mark: [markHoldingNode.status, (await markHoldingNode.json()).message]
      }
    }
  },

  async stock () {
    const c = client('stock')
    const seen = []
    await waitFor('sync', () => synced(c))
    c.provider.ws.addEventListener('message', (e) => seen.push(new Uint8Array(e.data)[0]))
    for (let i = 0; i < 10; i++) c.text.insert(0, `${i}`)
    // Another client's edit after them comes back to this one after anything the engine sent
    // it about its own ten.
    const other = client('other')
    await waitFor('the other synced', () => synced(other))
    other.text.insert(0, 'END;')
    await waitFor('the edit after them', () => c.text.toString().includes('END;'))
    other.provider.destroy()
    c.provider.destroy()
    const unknown = seen.filter((t) => t > 3)
    if (unknown.length) fail(`stock client received message types ${unknown}`)
    return { types: [...new Set(seen)].sort() }
  },

  // Named versions with two live editors: mark two, read one back, restore the first; both
  // editors see the restore (formatting and map keys included) as an ordinary change.
  async versions () {
    const http = serviceUrl.replace(/^ws/, 'http')
    const api = async (method, path, body, status = 200) => {
      const r = await fetch(`${http}/v1/data/${docId}${path}`, { method, body: body && JSON.stringify(body) })
      if (r.status !== status) fail(`${method} ${path} answered ${r.status}: ${await r.text()}`)
      return (r.headers.get('content-type') || '').includes('json') ? r.json() : r.text()
    }
    const a = client('ada')
    const b = client('bob')
    await waitFor('both synced', () => synced(a) && synced(b))
    a.text.insert(0, 'first draft.')
    a.text.format(0, 5, { bold: true })
    a.map.set('title', 'Draft')
    await waitFor('the first draft to converge', () => sameState([a, b]) && b.map.get('title') === 'Draft')
    const v1 = (await api('POST', '/versions', { label: 'first', user: 'ada' }, 201)).version

    b.text.delete(0, b.text.length)
    b.text.insert(0, 'second draft.')
    b.map.set('title', 'Second')
    b.map.set('extra', 1)
    await waitFor('the second draft to converge', () => sameState([a, b]) && a.map.get('extra') === 1)
    const v2 = (await api('POST', '/versions', { label: 'second' }, 201)).version
    const list = await api('GET', '/versions')
    const v1Text = await api('GET', `/versions/${v1.id}?format=text&name=content`)
    const v1Json = await api('GET', `/versions/${v1.id}`)

    const restored = await api('POST', `/versions/${v1.id}/restore`)
    const wantDelta = JSON.stringify([{ insert: 'first', attributes: { bold: true } }, { insert: ' draft.' }])
    await waitFor('both editors to see the restored version',
      () => [a, b].every((c) => JSON.stringify(c.text.toDelta()) === wantDelta &&
        c.map.get('title') === 'Draft' && !c.map.has('extra')))
    // Editing goes on as usual after a restore.
    a.text.insert(a.text.length, ' Edited after the restore.')
    await waitFor('an edit after the restore to converge', () => sameState([a, b]) && b.text.toString().endsWith('restore.'))
    const text = a.text.toString()
    a.provider.destroy()
    b.provider.destroy()
    return { v1, v2, list, v1Text, v1Json, restored, text }
  },

  // History eviction with two live editors: the hard job (content kept) compacts the page's
  // log under them and they edit on; the soft job passes an open page over; eviction that
  // deletes closes them with 4404 and keeps the named version.
  async eviction () {
    const http = serviceUrl.replace(/^ws/, 'http')
    const call = async (method, path, body) => {
      const r = await fetch(`${http}${path}`, { method, body: body && JSON.stringify(body) })
      if (r.status >= 300) fail(`${method} ${path} answered ${r.status}: ${await r.text()}`)
      return r.json()
    }
    const count = () => call('GET', `/v1/history/count?doc=${docId}`)
    const a = client('ada')
    const b = client('bob')
    const closes = { ada: [], bob: [] }
    for (const c of [a, b]) {
      c.provider.on('connection-close', (event) => {
        closes[c.name].push(event?.code)
        if (event?.code >= 4400 && event?.code < 4500) c.provider.destroy()
      })
    }
    await waitFor('both synced', () => synced(a) && synced(b))
    for (let i = 0; i < 30; i++) {
      a.text.insert(a.text.length, `a${i} `)
      if (i % 3 === 0 && b.text.length > 0) b.text.delete(0, 1)
      await new Promise((resolve) => setTimeout(resolve, 2))
    }
    await waitFor('the edits to converge', () => sameState([a, b]) && a.text.toString().includes('a29'))
    await call('POST', `/v1/data/${docId}/versions`, { label: 'before eviction' })
    const before = await count()

    const hard = await call('POST', '/v1/history/evict/hard?threshold-hours=0')
    const afterHard = await count()
    b.text.insert(0, 'after eviction: ')
    await waitFor('an edit after the eviction to converge', () => sameState([a, b]) && a.text.toString().startsWith('after eviction: '))
    const text = a.text.toString()

    // Once the edit is stored, the page has history again; the soft job must pass it over
    // because it is open.
    const stored = Date.now()
    while ((await count()).updates === 0) {
      if (Date.now() - stored > WAIT_MS) fail('the edit after the eviction was never stored')
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    const soft = await call('POST', '/v1/history/evict/soft?threshold-hours=0')
    const deleting = await call('POST', '/v1/history/evict/hard?threshold-hours=0&delete=true')
    await waitFor('both editors closed with 4404', () => closes.ada.includes(4404) && closes.bob.includes(4404))
    const afterDelete = await count()
    const version = await call('GET', `/v1/data/${docId}/versions`)
    return { before, hard, afterHard, text, soft, deleting, afterDelete, versions: version.versions.length }
  },

  // Maintenance locks with two live editors: a locked page keeps its editors connected and
  // readable but refuses their edits (permission-denied hub.error/locked, REST 423); what they
  // typed meanwhile comes in when the lock is released, or when it expires.
  async locks () {
    const http = serviceUrl.replace(/^ws/, 'http')
    const denied = []
    const warn = console.warn
    console.warn = (...words) => {
      const line = words.join(' ')
      if (line.includes('Permission denied')) denied.push(line)
      else warn(...words)
    }
    const lockUrl = (id) => `${http}/v1/hub-lock-state?lock-id=${id}`
    const lock = async (id, body) => {
      const r = await fetch(lockUrl(id), { method: 'POST', body: JSON.stringify(body) })
      if (r.status !== 200) fail(`lock answered ${r.status}: ${await r.text()}`)
      return r.json()
    }
    const reset = () => fetch(`${http}/v1/data/${docId}?reset=true&name=content`, { method: 'PUT', body: 'reset' })
    const a = client('ada')
    const b = client('bob')
    await waitFor('both synced', () => synced(a) && synced(b))
    a.text.insert(0, 'before the lock. ')
    await waitFor('the first edit to converge', () => sameState([a, b]) && b.text.length > 0)

    const first = crypto.randomUUID()
    const taken = await lock(first, { 'point-list': [docId], 'timeout-ms': 60000 })
    b.text.insert(b.text.length, 'typed while locked. ')
    await waitFor('bob to be told the page is locked', () => denied.some((l) => l.includes('hub.error/locked')))
    const refused = await reset()
    const refusal = await refused.json()
    if (refused.status !== 423 || refusal.type !== 'hub.error/locked') fail(`a reset under the lock answered ${refused.status} ${JSON.stringify(refusal)}`)
    const read = await fetch(`${http}/v1/data/${docId}?format=text&name=content`)
    const readText = await read.text()
    if (read.status !== 200 || readText !== 'before the lock. ') fail(`a read under the lock answered ${read.status} ${readText}`)
    if (a.text.toString().includes('typed while locked')) fail('an edit got through the lock')
    if (!a.provider.wsconnected || !b.provider.wsconnected) fail('a lock closed an editor')
    const listed = await (await fetch(`${http}/v1/hub-lock-state`)).json()

    const released = await fetch(lockUrl(first), { method: 'DELETE' })
    if (released.status !== 200) fail(`unlock answered ${released.status}`)
    const releasedBody = await released.json()
    const unlockedAt = Date.now()
    await waitFor("bob's refused edit to arrive once the lock is released",
      () => a.text.toString().includes('typed while locked') && sameState([a, b]))
    const afterRelease = Date.now() - unlockedAt

    // An app-wide lock that nobody releases ends by itself.
    const deniedBefore = denied.length
    await lock(crypto.randomUUID(), { 'confluence-all': true, 'timeout-ms': 1500 })
    a.text.insert(0, 'typed under an app-wide lock. ')
    await waitFor('ada to be told the app is locked', () => denied.length > deniedBefore)
    const lockedAt = Date.now()
    await waitFor("ada's edit to arrive once the lock expires",
      () => b.text.toString().startsWith('typed under an app-wide lock. ') && sameState([a, b]))
    const afterExpiry = Date.now() - lockedAt
    const text = a.text.toString()
    a.provider.destroy()
    b.provider.destroy()
    console.warn = warn
    return { text, taken, listed, released: releasedBody, refusal, denied: denied.length, afterRelease, afterExpiry }
  }
}

const run = scenarios[scenario]
if (!run) fail(`unknown scenario; choose one of ${Object.keys(scenarios).join(', ')}`)
const timer = setTimeout(() => fail('scenario took longer than 100 s'), 100000)
run().then((result) => {
  clearTimeout(timer)
  console.log(JSON.stringify({ ok: true, scenario, ...result }))
  process.exit(0)
}, (error) => fail(error?.stack || String(error)))
