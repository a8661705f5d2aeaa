// The seed pipeline in Node.
//   node seed.js parent -- CHILD...   the seed's parent.js (spawn with 'ipc' instead of fork, so
//                                     the child may be a Rust binary)
//   node seed.js child                the seed's child.js
//   node seed.js single               one process serving the same reply itself
// A server prints BENCH {"role":"seed-ready","addr":...,"pids":[...]} once listening.
'use strict'
const net = require('net')
const { parseArgs, emit, startChild, dieWithParent } = require('./common')

const { role, child: childCmd } = parseArgs(process.argv.slice(2))
dieWithParent()

if (role === 'parent') {
  const server = net.createServer()
  const child = startChild(childCmd)
  server.on('connection', function (socket) {
    child.send('socket', socket)
  })
  server.listen(0, '127.0.0.1', function () {
    emit('seed-ready', { addr: '127.0.0.1:' + server.address().port, pids: [process.pid, child.pid] })
  })
  child.on('exit', (code) => process.exit(code === null ? 1 : code))
} else if (role === 'child') {
  process.on('message', function (message, socket) {
    if (message === 'socket') socket.end('Child handled it.')
  })
} else if (role === 'single') {
  const server = net.createServer(function (socket) {
    socket.end('Child handled it.')
  })
  server.listen(0, '127.0.0.1', function () {
    emit('seed-ready', { addr: '127.0.0.1:' + server.address().port, pids: [process.pid] })
  })
} else {
  console.error('seed.js: unknown role ' + role)
  process.exit(2)
}
