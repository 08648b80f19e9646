package ledger_test

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel send SIGTERM to the service should the test binary die without stopping it
// (a panic, a -timeout kill).
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
