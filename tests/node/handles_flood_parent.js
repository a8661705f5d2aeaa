// Node as a parent that hands a handoff child many sockets at once while the child, before it
// receives anything, sends a handle of its own and waits for Node's acknowledgement.
// Usage: node handles_flood_parent.js N CHILD_PATH   (the child: ipc_probe, IPC_PROBE_HANDLE_FIRST=1)
// Prints one JSON line: {"childHandles": n, "gotChildHandle": bool} once the child answered, or
// {"error": ...} after 20 s.
'use strict'
const { spawn } = require('child_process')
const net = require('net')

const [n, childPath] = [Number(process.argv[2]), process.argv[3]]
const child = spawn(childPath, [], { stdio: [0, 1, 2, 'ipc'] })
let gotChildHandle = false
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: 'no answer within 20 s', gotChildHandle }))
  child.kill('SIGKILL')
  process.exit(1)
}, 20000)

const server = net.createServer()
server.listen(0, '127.0.0.1', () => {
  let connected = 0
  const sockets = []
  for (let i = 0; i < n; i++) {
    const client = net.connect(server.address().port, '127.0.0.1')
    sockets.push(client)
  }
  server.on('connection', (socket) => {
    child.send({ i: connected }, socket)
    if (++connected === n) child.send({ done: true })
  })
})

child.on('message', (msg, handle) => {
  if (msg === 'mine' && handle) {
    gotChildHandle = true
    handle.destroy()
  } else if (msg && typeof msg.handles === 'number') {
    clearTimeout(timer)
    console.log(JSON.stringify({ childHandles: msg.handles, gotChildHandle }))
    child.disconnect()
    process.exit(0)
  }
})
