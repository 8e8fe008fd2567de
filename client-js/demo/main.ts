// The demo editor served by the engine at `{ctx}/demo/`: CodeMirror 6 bound to a Y.Text through
// y-codemirror.next, connected with SynchronyProvider. Who you are comes from the token's
// `session` claim when the page has a token (`#token=…`), otherwise from `?name=` or a guest name
// kept for this tab.
import * as Y from 'yjs'
import { EditorView, basicSetup } from 'codemirror'
import { EditorState, Compartment } from '@codemirror/state'
import { keymap } from '@codemirror/view'
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next'
import { SynchronyProvider, tokenClaims, type PermanentFailure } from '../src/index.js'

const COLOURS = ['#d1495b', '#00798c', '#edae49', '#66a182', '#8e6c8a', '#2e4057', '#e07a5f', '#3d5a80']

interface Identity {
  name: string
  color: string
}

const $ = <T extends HTMLElement>(id: string): T => {
  const element = document.getElementById(id)
  if (!element) throw new Error(`demo page is missing #${id}`)
  return element as T
}

/** The engine's base URL: this page lives at `{ctx}/demo/`. */
function serviceUrl (): string {
  const ctx = location.pathname.replace(/\/demo(\/.*)?$/, '')
  return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}${ctx}`
}

function colourFor (name: string): string {
  let hash = 0
  for (const c of name) hash = (hash * 31 + c.codePointAt(0)!) >>> 0
  return COLOURS[hash % COLOURS.length]!
}

function identity (token: string | undefined, query: URLSearchParams): Identity {
  const claims = token ? tokenClaims(token) : undefined
  const session = claims?.session as Record<string, unknown> | undefined
  const fromToken = [session?.fullname, session?.name, claims?.sub].find((v) => typeof v === 'string' && v !== '')
  let name = (fromToken as string | undefined) ?? query.get('name') ?? sessionStorage.getItem('synchrony-demo-name')
  if (!name) {
    name = `Guest ${Math.floor(100 + Math.random() * 900)}`
    sessionStorage.setItem('synchrony-demo-name', name)
  }
  const color = typeof session?.color === 'string' && /^#[0-9a-fA-F]{6}$/.test(session.color) ? session.color : colourFor(name)
  return { name, color }
}

function describeFailure ({ code, reason }: PermanentFailure): string {
  switch (code) {
    case 4401:
      return `This engine needs a token (${reason || 'refused'}). Open the page as …/demo/?doc=…#token=<token>; \`synchrony token\` mints one.`
    case 4403:
      return `Your token does not grant access to this document (${reason || 'forbidden'}).`
    case 4404:
      return 'This document was deleted. Reload to start it again.'
    case 4413:
      return `The document or an edit is over the engine's size limit (${reason}).`
    default:
      return `The engine refused the connection: ${code} ${reason}`
  }
}

function main (): void {
  const query = new URLSearchParams(location.search)
  const fragment = new URLSearchParams(location.hash.slice(1))
  const token = fragment.get('token') ?? query.get('token') ?? undefined
  const docId = query.get('doc') || 'demo'
  const me = identity(token, query)

  const docInput = $<HTMLInputElement>('doc')
  docInput.value = docId
  $<HTMLFormElement>('open').addEventListener('submit', (event) => {
    event.preventDefault()
    const next = new URL(location.href)
    next.searchParams.set('doc', docInput.value.trim() || 'demo')
    location.assign(next)
  })

  const ydoc = new Y.Doc()
  const ytext = ydoc.getText('codemirror')
  const provider = new SynchronyProvider(serviceUrl(), docId, ydoc, token ? { token } : {})
  provider.awareness.setLocalStateField('user', { name: me.name, color: me.color, colorLight: `${me.color}33` })

  const editable = new Compartment()
  const view = new EditorView({
    parent: $('editor'),
    state: EditorState.create({
      doc: ytext.toString(),
      extensions: [
        keymap.of(yUndoManagerKeymap),
        basicSetup,
        EditorView.lineWrapping,
        editable.of(EditorView.editable.of(true)),
        yCollab(ytext, provider.awareness),
        // Names above the other people's cursors stay visible (the stock theme shows them on hover).
        EditorView.theme({ '.cm-ySelectionInfo': { opacity: '1', fontFamily: 'inherit', top: '-1.3em', borderRadius: '3px 3px 3px 0' } })
      ]
    })
  })

  const statusEl = $('status')
  const savedEl = $('saved')
  const noticeEl = $('notice')
  const showStatus = (): void => {
    const failed = provider.failure !== null
    const status = failed ? 'failed' : provider.status
    statusEl.dataset.status = status
    statusEl.textContent = failed
      ? 'Stopped'
      : { connecting: 'Connecting…', connected: provider.synced ? 'Connected' : 'Syncing…', disconnected: 'Offline, retrying' }[provider.status]
    const saved = provider.saved ? 'saved' : provider.status === 'connected' && provider.synced ? 'saving' : 'unsaved'
    savedEl.dataset.saved = saved
    savedEl.textContent = { saved: 'All changes saved', saving: 'Saving…', unsaved: 'Unsaved changes' }[saved]
  }
  provider.on('status', showStatus)
  provider.on('synced', showStatus)
  provider.on('saved', showStatus)
  provider.on('permanent-failure', (failure: PermanentFailure) => {
    // Nothing typed now could be saved.
    view.dispatch({ effects: editable.reconfigure(EditorView.editable.of(false)) })
    noticeEl.textContent = describeFailure(failure)
    noticeEl.hidden = false
    showStatus()
  })
  provider.on('permission-denied', () => {
    view.dispatch({ effects: editable.reconfigure(EditorView.editable.of(false)) })
    noticeEl.textContent = 'Read only: your token lets you read this document, not change it.'
    noticeEl.hidden = false
  })
  showStatus()

  const peopleEl = $('people')
  const showPeople = (): void => {
    peopleEl.replaceChildren()
    const states = [...provider.awareness.getStates().entries()].sort(([a], [b]) => a - b)
    for (const [clientId, state] of states) {
      const user = state.user as Identity | undefined
      if (!user) continue
      const chip = document.createElement('li')
      chip.className = 'person'
      chip.style.setProperty('--colour', user.color)
      chip.textContent = clientId === ydoc.clientID ? `${user.name} (you)` : user.name
      peopleEl.append(chip)
    }
  }
  provider.awareness.on('change', showPeople)
  showPeople()

  document.title = `${docId} · Synchrony demo`
  window.addEventListener('beforeunload', () => provider.destroy())
  // For the curious (and the browser tests): the live objects.
  Object.assign(window, { synchronyDemo: { provider, ydoc, view } })
}

main()
