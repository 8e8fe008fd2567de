export { SynchronyProvider } from './provider.js'
export type { ProviderOptions, Status, PermanentFailure } from './provider.js'
export { backoffDelay, isPermanent, tokenClaims, tokenExpiry, encodePersisted, MSG_PERSISTED } from './protocol.js'
