// {{name}}: a sendbox plugin. A webhook becomes an email to `to`.
import { Email, Outcome, config, onWebhook } from './sendbox-pdk.js';
export { handle } from './sendbox-pdk.js';

onWebhook((req) => Outcome.email(new Email({
  to: config.get('to', 'ops@example.com'),
  subject: `Webhook: ${req.path}`,
  text: req.text(),
})));
