// Hocuspocus (@hocuspocus/server) with its defaults and no extensions, on a free loopback port;
// prints a ready line like the engine's.
import { Server } from '@hocuspocus/server'

const server = new Server({ port: Number(process.env.PORT || 0), address: '127.0.0.1', quiet: true })
await server.listen()
console.log(JSON.stringify({ event: 'ready', port: server.address.port, pid: process.pid }))
process.on('SIGTERM', () => server.destroy().then(() => process.exit(0)))
