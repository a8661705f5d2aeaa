// Shared by interop_peer.js (Node as the child of a Rust test) and interop_parent.js (Node as the
// parent of examples/interop_child): the small protocols run over handed-over handles, and the
// resources handed over. tests/node_interop.rs and examples/interop_child.rs speak the same ones:
//
// * stream: the side that received a connected socket writes `<who> says hi\n`, reads one line L,
//   writes `<who> got: L\n` and ends. The client outside reads the greeting, writes `ping\n` and
//   reads to the end, so it sees `<who> says hi\n<who> got: ping\n`.
// * server: the side that received a listening socket answers every connection with
//   `<who> accepted\n` and ends it.
// * dgram: the side that received a UDP socket answers every datagram P with `<who>:P`.
// * raw dgram (dgram.Native in Node): the raw handle reports each datagram over IPC as
//   {op: 'datagram', id, data} (a raw UDP handle has no public send).
'use strict'
const net = require('net')
const dgram = require('dgram')
const fs = require('fs')
const os = require('os')
const path = require('path')

const values = require('./interop_values.json')

// The 1 MiB string both sides build: 15 UTF-8 bytes per repetition, with 1-, 2-, 3- and 4-byte
// characters and a raw U+2028.
const BIG_UNIT = 'abc\u00fc\u20ac\ud83d\ude00\u2028'
function bigString (reps) { return BIG_UNIT.repeat(reps) }

function isOp (msg) {
  return msg !== null && typeof msg === 'object' && !Array.isArray(msg) && typeof msg.op === 'string'
}

// What a received handle is, as Node sees it: the class for wrapped handles, the native wrap's
// class (TCP, Pipe, UDP) for raw ones.
function describe (handle) {
  if (handle instanceof net.Socket) return 'net.Socket'
  if (handle instanceof net.Server) return 'net.Server'
  if (handle instanceof dgram.Socket) return 'dgram.Socket'
  if (handle === null || handle === undefined) return String(handle)
  return handle.constructor.name
}

function serveStream (socket, who) {
  let buf = ''
  let answered = false
  socket.setEncoding('utf8')
  socket.on('error', () => {})
  socket.write(`${who} says hi\n`)
  socket.on('data', (d) => {
    buf += d
    const nl = buf.indexOf('\n')
    if (nl >= 0 && !answered) {
      answered = true
      socket.end(`${who} got: ${buf.slice(0, nl)}\n`)
    }
  })
}

function streamClient (socket, done) {
  let text = ''
  let pinged = false
  let finished = false
  const finish = (t) => { if (!finished) { finished = true; done(t) } }
  socket.setEncoding('utf8')
  socket.on('data', (d) => {
    text += d
    if (!pinged && text.includes('\n')) { pinged = true; socket.write('ping\n') }
  })
  socket.on('end', () => finish(text))
  socket.on('close', () => finish(text))
  socket.on('error', (e) => finish(text + `<error ${e.code}>`))
}

function serveServer (server, who) {
  server.on('connection', (s) => { s.on('error', () => {}); s.end(`${who} accepted\n`) })
}

// Connects to a server n times in turn, collecting each full reply.
function collectReplies (connectArgs, n, done, acc = []) {
  if (acc.length === n) return done(acc)
  const c = net.connect(...connectArgs)
  let text = ''
  c.setEncoding('utf8')
  c.on('data', (d) => { text += d })
  c.on('error', (e) => { text += `<error ${e.code}>` })
  c.on('close', () => { acc.push(text); collectReplies(connectArgs, n, done, acc) })
}

// Sends `payload` from a fresh UDP socket to address:port and returns the first answer.
function udpRoundTrip (type, address, port, payload, done) {
  const c = dgram.createSocket(type)
  const timer = setTimeout(() => { c.close(); done('<timeout>') }, 10000)
  c.on('message', (m) => { clearTimeout(timer); c.close(); done(m.toString()) })
  c.send(payload, port, address)
}

function serveDgram (socket, who) {
  socket.on('message', (m, rinfo) => socket.send(`${who}:${m}`, rinfo.port, rinfo.address))
}

// A raw UDP handle: report datagrams through `report(text, rinfo)`.
function serveRawDgram (handle, report) {
  handle.onmessage = (nread, _handle, buf, rinfo) => {
    if (nread >= 0 && buf) report(buf.toString(), rinfo)
  }
  handle.recvStart()
}

let serial = 0
function unixPath (tag) {
  return path.join(os.tmpdir(), `handoff-interop-${process.pid}-${tag}-${serial++}.sock`)
}
// An abstract-namespace name: Node unlinks a filesystem socket path when it closes the server it
// bound, which would leave the receiver's copy unreachable.
function abstractName (tag) {
  return `\0handoff-interop-${process.pid}-${tag}-${serial++}`
}

function unlinkQuietly (p) { try { fs.unlinkSync(p) } catch (_) {} }

// Creates a handle of `kind` to hand over. Calls back
// `ready({handle, info, afterSend, client})`:
// * handle: what to pass to send();
// * info: fields for the message (port, path, ...);
// * afterSend: run in send()'s callback (releases our copy where we must not compete);
// * client(done): for connected sockets, runs the stream client on the other end;
// * server: for connected sockets, the net.Server that accepted them (still open).
function makeHandle (kind, ready) {
  switch (kind) {
    case 'tcp-socket':
    case 'native-tcp-socket': {
      const server = net.createServer({ pauseOnConnect: true })
      server.listen(0, '127.0.0.1', () => {
        const port = server.address().port
        const client = net.connect(port, '127.0.0.1')
        server.once('connection', (sock) => {
          const native = kind === 'native-tcp-socket'
          ready({
            handle: native ? sock._handle : sock,
            info: { port },
            afterSend: native ? () => sock.destroy() : () => {},
            client: (done) => streamClient(client, done),
            server
          })
        })
      })
      return
    }
    case 'unix-socket': {
      const p = unixPath('sock')
      unlinkQuietly(p)
      const server = net.createServer({ pauseOnConnect: true })
      server.listen(p, () => {
        const client = net.connect(p)
        server.once('connection', (sock) => {
          unlinkQuietly(p) // connected: the name is no longer needed
          ready({ handle: sock, info: { path: p }, afterSend: () => {}, client: (done) => streamClient(client, done) })
        })
      })
      return
    }
    case 'tcp-server':
    case 'native-tcp-server': {
      const server = net.createServer({ pauseOnConnect: true })
      server.listen(0, '127.0.0.1', () => {
        const native = kind === 'native-tcp-server'
        ready({
          handle: native ? server._handle : server,
          info: { port: server.address().port },
          afterSend: () => server.close()
        })
      })
      return
    }
    case 'unix-server': {
      const name = abstractName('server')
      const server = net.createServer({ pauseOnConnect: true })
      server.listen(name, () => {
        ready({ handle: server, info: { abstract: name.slice(1) }, afterSend: () => server.close() })
      })
      return
    }
    case 'udp4':
    case 'udp6':
    case 'native-udp': {
      const type = kind === 'udp6' ? 'udp6' : 'udp4'
      const socket = dgram.createSocket(type)
      socket.bind(0, type === 'udp6' ? '::1' : '127.0.0.1', () => {
        const { address, port } = socket.address()
        ready({
          handle: kind === 'native-udp' ? socket._handle : socket,
          info: { address, port, type },
          afterSend: () => socket.close()
        })
      })
      return
    }
    default:
      throw new Error(`unknown kind ${kind}`)
  }
}

function out (obj) { process.stdout.write(JSON.stringify(obj) + '\n') }

module.exports = {
  values,
  bigString,
  isOp,
  describe,
  serveStream,
  streamClient,
  serveServer,
  collectReplies,
  udpRoundTrip,
  serveDgram,
  serveRawDgram,
  makeHandle,
  unixPath,
  unlinkQuietly,
  out
}
