// The seed's child.js.
'use strict'

process.on('message', function (message, socket) {
  if (message === 'socket') socket.end('Child handled it.')
})
