// stdout carries exactly one line, the addresses; everything else goes to
// stderr, minus oidc-provider's development-mode notices.
for (const level of ['log', 'info', 'warn']) {
  console[level] = (...args) => {
    const text = args.map(String).join(' ');
    if (text.startsWith('oidc-provider WARNING') || text.startsWith('oidc-provider NOTICE')) return;
    process.stderr.write(text + '\n');
  };
}

