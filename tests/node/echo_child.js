// Node's counterpart of examples/echo_child.rs: echoes every socket it is handed.
'use strict'

process.on('message', function (message, socket) {
  if (socket) socket.pipe(socket)
})
