//go:build !linux

package ledger_test

import "os/exec"

func setDeathSignal(cmd *exec.Cmd) {}
