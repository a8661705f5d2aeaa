// The seed's parent.js, starting any child through spawn(..., 'ipc') instead of fork, so that the
// child can be a Rust binary. Usage: node parent.js PORT CHILD_PATH [ARGS...]
'use strict'
const { createServer } = require('net')
const { spawn } = require('child_process')

const [port, childPath, ...childArgs] = process.argv.slice(2)
const server = createServer()
const child = spawn(childPath, childArgs, { stdio: [0, 1, 2, 'ipc'] })

server.on('connection', function (socket) {
  child.send('socket', socket)
})
.listen(Number(port), '127.0.0.1', function () {
  console.log('listening on 127.0.0.1:' + server.address().port)
})
child.on('exit', (code) => process.exit(code === null ? 1 : code))
