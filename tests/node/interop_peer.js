// Node in the child role for tests/node_interop.rs: a responder the Rust parent drives over the
// IPC channel. Mirror of examples/interop_child.rs (the Rust responder a Node parent drives).
//
// Every message that is not an object with a string `op` is echoed back unchanged. Commands:
//   {op:'values'}                 send each value of interop_values.json, then {op:'values-done'}
//   {op:'big', reps}              send {op:'big', value: bigString(reps)}
//   {op:'many', n}                send {seq: 0} .. {seq: n-1}
//   {op:'take', as, id} + handle  report {op:'took', id, as, got, ...} and serve it (interop_lib.js);
//                                 as = stream | native-stream | server | dgram | native-dgram
//   {op:'close-server', id}       close a server taken earlier, then {op:'closed-server', id}
//   {op:'give', kind, id}         send a handle of `kind` with {op:'given', id, kind, ...info};
//                                 then {op:'released', id} once our copy is released; for
//                                 connected sockets also {op:'client-got', id, data} from our client
//   {op:'give-many', kind, n, base}  give n handles, ids base .. base+n-1, without waiting
//   {op:'server-count', id}       getConnections() on the server that accepted the socket given
//                                 as `id`: {op:'server-count', id, count, error}
//   {op:'server-close', id}       close() that server: {op:'server-closed', id, error}
//   {op:'internal'}               send {cmd:'NODE_CUSTOM', x:1}, then {op:'after-internal'}
//   {op:'disconnect'}             process.disconnect()
// On 'disconnect' the process exits 0.
'use strict'
process.noDeprecation = true // dgram's _handle getter warns
const net = require('net')
const lib = require('./interop_lib')

// Node's SocketListSend adds a process 'exit' listener per (server, channel): the fd test gives
// sockets from dozens of servers, which would print MaxListenersExceededWarning.
process.setMaxListeners(0)

const WHO = 'node'
const taken = new Map()
const acceptedBy = new Map() // give id -> the net.Server that accepted the socket given

function give (kind, id) {
  lib.makeHandle(kind, ({ handle, info, afterSend, client, server }) => {
    if (server) acceptedBy.set(id, server)
    process.send({ op: 'given', id, kind, ...info }, handle, (err) => {
      if (err) { process.send({ op: 'error', id, error: String(err) }); return }
      afterSend()
      process.send({ op: 'released', id })
    })
    if (client) client((data) => process.send({ op: 'client-got', id, data }))
  })
}

function take (msg, handle) {
  const { id } = msg
  const report = { op: 'took', id, as: msg.as, got: lib.describe(handle) }
  switch (msg.as) {
    case 'stream':
      lib.serveStream(handle, WHO)
      break
    case 'native-stream': {
      const socket = new net.Socket({ handle, readable: true, writable: true })
      lib.serveStream(socket, WHO)
      break
    }
    case 'server':
      taken.set(id, handle)
      lib.serveServer(handle, WHO)
      report.address = handle.address()
      break
    case 'dgram':
      taken.set(id, handle)
      lib.serveDgram(handle, WHO)
      report.type = handle.type
      report.address = handle.address()
      break
    case 'native-dgram':
      taken.set(id, handle)
      lib.serveRawDgram(handle, (data, rinfo) => process.send({ op: 'datagram', id, data, from: rinfo }))
      break
  }
  process.send(report)
}

process.on('message', (msg, handle) => {
  if (!lib.isOp(msg)) { process.send(msg); return }
  switch (msg.op) {
    case 'values':
      for (const v of lib.values) process.send(v)
      process.send({ op: 'values-done', count: lib.values.length })
      break
    case 'big':
      process.send({ op: 'big', value: lib.bigString(msg.reps) })
      break
    case 'many':
      for (let i = 0; i < msg.n; i++) process.send({ seq: i })
      break
    case 'take':
      take(msg, handle)
      break
    case 'close-server':
      taken.get(msg.id).close(() => process.send({ op: 'closed-server', id: msg.id }))
      break
    case 'give':
      give(msg.kind, msg.id)
      break
    case 'give-many':
      for (let i = 0; i < msg.n; i++) give(msg.kind, msg.base + i)
      break
    case 'server-count': // socket lists (protocol doc section 6): asks the receiving peer
      acceptedBy.get(msg.id).getConnections((err, count) =>
        process.send({ op: 'server-count', id: msg.id, count, error: err ? String(err) : null }))
      break
    case 'server-close':
      acceptedBy.get(msg.id).close((err) =>
        process.send({ op: 'server-closed', id: msg.id, error: err ? String(err) : null }))
      break
    case 'internal':
      process.send({ cmd: 'NODE_CUSTOM', x: 1 })
      process.send({ op: 'after-internal' })
      break
    case 'disconnect':
      process.disconnect()
      break
    default:
      process.send({ op: 'error', error: `unknown op ${msg.op}` })
  }
})
process.on('disconnect', () => process.exit(0))
