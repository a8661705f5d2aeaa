// TCP sockets handed to a child.
//   node handles.js send --count N --mode socket|native -- CHILD...
//     Makes N connected pairs on 127.0.0.1, then child.send('h', socket) for each (mode socket:
//     a net.Socket; mode native: its raw handle, sent as net.Native). Node's own queue holds each
//     send until the previous handle is acknowledged; a few are kept queued at a time.
//   node handles.js recv --count N
'use strict'
const net = require('net')
const { parseArgs, emit, startChild, dieWithParent, nowUs } = require('./common')

const { role, opts, child: childCmd } = parseArgs(process.argv.slice(2))
dieWithParent()

async function makePool (count) {
  const accepted = []
  const clients = []
  let onAccept = null
  const server = net.createServer({ pauseOnConnect: true }, (socket) => {
    accepted.push(socket)
    if (onAccept) onAccept()
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', 1024, resolve))
  const port = server.address().port
  // Connect in batches, under the listen backlog.
  for (let done = 0; done < count;) {
    const batch = Math.min(256, count - done)
    const want = accepted.length + batch
    await new Promise((resolve, reject) => {
      onAccept = () => { if (accepted.length >= want) resolve() }
      for (let i = 0; i < batch; i++) {
        const c = net.connect(port, '127.0.0.1')
        c.on('error', reject)
        clients.push(c)
      }
    })
    done += batch
  }
  onAccept = null
  server.close()
  return { accepted, clients }
}

if (role === 'send') {
  const count = Number(opts.count)
  const mode = opts.mode || 'socket'
  const child = startChild(childCmd)
  const poolReady = makePool(count)
  let started = false
  child.on('message', async (m) => {
    if (m === 'ready' && !started) {
      started = true
      const { accepted } = await poolReady
      const t = nowUs()
      // Keep a few sends outstanding (the callback fires once Node has written the handle, i.e.
      // after the previous one's ACK). Queueing all N at once would measure Node's queue, which
      // re-submits every queued message on each ACK (quadratic), not its handle passing.
      let next = 0
      let outstanding = 0
      const pump = () => {
        while (outstanding < 4 && next < accepted.length) {
          const socket = accepted[next++]
          outstanding++
          child.send('h', mode === 'native' ? socket._handle : socket, () => { outstanding--; pump() })
        }
      }
      pump()
      child.once('message', (done) => {
        if (done === 'done') {
          emit('handles-send', { count, secs: (nowUs() - t) / 1e6 })
          child.disconnect()
        }
      })
    }
  })
  child.on('exit', (code) => process.exit(code === null ? 1 : code))
} else if (role === 'recv') {
  const count = Number(opts.count)
  let got = 0
  let t0 = 0
  let last = 0
  process.on('message', (m, handle) => {
    if (!handle) return
    got++
    last = nowUs()
    if (got === 1) t0 = last
    if (handle instanceof net.Socket) handle.destroy()
    else handle.close()
    if (got === count) process.send('done')
  })
  process.on('disconnect', () => {
    emit('handles-recv', { count: got, secs: (last - t0) / 1e6, errors: 0 })
  })
  process.send('ready')
} else {
  console.error('handles.js: unknown role ' + role)
  process.exit(2)
}
