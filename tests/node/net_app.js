// An unchanged Node TCP app (`net`): writes its pid and closes each connection.
'use strict'
const net = require('net')
net.createServer((socket) => socket.end(`pid=${process.pid}\n`)).listen(process.env.PORT, process.env.HOST)
