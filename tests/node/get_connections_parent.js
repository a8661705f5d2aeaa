// A Node parent whose server hands its connections to a child (any program, spawned with an
// 'ipc' stdio entry), then checks that server.getConnections() counts the sockets the child holds
// and that server.close() waits for them. Usage: node get_connections_parent.js CHILD_PATH N
// Prints one JSON line per step on stdout; exits 0 when every step passed.
'use strict'
const net = require('net')
const { spawn } = require('child_process')

const [childPath, n] = [process.argv[2], Number(process.argv[3])]
const child = spawn(childPath, [], { stdio: [0, 'inherit', 'inherit', 'ipc'] })
const report = (o) => console.log(JSON.stringify(o))
const fail = (why) => { report({ step: 'failed', why }); process.exit(1) }
setTimeout(() => fail('timed out'), 20000).unref()

function waitCount (expected, cb) {
  server.getConnections((err, count) => {
    if (err) return fail(String(err))
    if (count === expected) return cb(count)
    setTimeout(() => waitCount(expected, cb), 20)
  })
}

const server = net.createServer()
let accepted = 0
server.on('connection', (socket) => {
  child.send('socket', socket, () => {
    if (++accepted === n) waitCount(n, (count) => { report({ step: 'sent', count }); closeOneByOne() })
  })
})
const clients = []
server.listen(0, '127.0.0.1', () => {
  for (let i = 0; i < n; i++) {
    const c = net.connect(server.address().port, '127.0.0.1')
    c.on('data', () => {})
    clients.push(c)
  }
})

function closeOneByOne () {
  if (clients.length === 1) return closeServer()
  clients.pop().end()
  waitCount(clients.length, (count) => { report({ step: 'after-close', count }); closeOneByOne() })
}

function closeServer () {
  let closed = false
  server.close(() => { closed = true; report({ step: 'closed' }); child.disconnect() })
  setTimeout(() => {
    report({ step: 'close-pending', closed })
    clients.pop().end()
  }, 300)
}
child.on('exit', (code) => { report({ step: 'child-exit', code }); process.exit(0) })
