// Node child for the disconnect tests in tests/node_interop.rs. Sends 'ready', echoes messages,
// calls process.disconnect() when told 'disconnect-me', and reports its channel events on stdout
// as JSON lines: {event: 'disconnect', connected} and {event: 'exit', code}. It never exits on
// purpose: it must leave by itself once the channel is gone.
'use strict'
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n')

process.on('message', (m) => {
  if (m === 'disconnect-me') process.disconnect()
  else process.send(m)
})
process.on('disconnect', () => say({ event: 'disconnect', connected: process.connected }))
process.on('exit', (code) => say({ event: 'exit', code }))
process.send('ready')
