module github.com/quota-ledger/ledger-service/clients/go

go 1.19
