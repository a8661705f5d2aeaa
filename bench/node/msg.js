// One-way messages (see bench/src/roles/msg.rs for the handshake).
//   node msg.js send --size S --secs T --min-count N -- CHILD...
//   node msg.js recv
'use strict'
const { parseArgs, messageMaker, emit, startChild, dieWithParent, nowUs } = require('./common')

const { role, opts, child: childCmd } = parseArgs(process.argv.slice(2))
dieWithParent()

if (role === 'send') {
  const size = Number(opts.size)
  const secs = Number(opts.secs || 0.5)
  const minCount = Number(opts['min-count'] || 1)
  const make = messageMaker(size)
  const child = startChild(childCmd)
  // Keep at most this many bytes written-but-unconfirmed (handoff's default send_buffer), so
  // Node's queue does not grow without bound; the callback fires once a message is written.
  const WINDOW = 4 * 1024 * 1024
  const every = size >= 4096 ? 1 : 64
  let sent = 0
  let confirmed = 0
  let waiting = false
  let deadline = 0
  let finished = false
  const confirm = (n) => () => {
    confirmed = n
    if (waiting) { waiting = false; setImmediate(pump) }
  }
  function pump () {
    while (!finished) {
      if ((sent - confirmed) * size >= WINDOW) { waiting = true; return }
      const last = sent + 1 >= minCount && (sent + 1) % every === 0 && Date.now() >= deadline
      const n = ++sent
      if (last) {
        finished = true
        child.send(make(n - 1), () => { child.disconnect() })
      } else if (n % every === 0) {
        child.send(make(n - 1), confirm(n))
      } else {
        child.send(make(n - 1))
      }
    }
  }
  child.on('message', (m) => {
    if (m === 'ready' && deadline === 0) {
      child.send('start')
      deadline = Date.now() + secs * 1000
      pump()
    }
  })
  child.on('exit', (code) => {
    emit('msg-send', { sent })
    process.exit(code === null ? 1 : code)
  })
} else if (role === 'recv') {
  let t0 = 0
  let last = 0
  let count = 0
  let bytes = 0
  let started = false
  process.on('message', (m) => {
    if (!started) { started = true; t0 = nowUs(); last = t0; return }
    count++
    bytes += typeof m === 'string' ? m.length + 2 : 64
    last = nowUs()
  })
  process.on('disconnect', () => {
    emit('msg-recv', { count, bytes, secs: (last - t0) / 1e6, errors: 0 })
  })
  process.send('ready')
} else {
  console.error('msg.js: unknown role ' + role)
  process.exit(2)
}
